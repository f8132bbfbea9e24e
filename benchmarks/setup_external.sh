#!/usr/bin/env bash
# Virtual environments for the comparisons against other tools, kept in the
# benchmark cache ($SDCPP_PY_BENCH_CACHE, default benchmarks/cache):
#   venv-sdcpp-python  stable-diffusion-cpp-python 0.4.7 from PyPI (same engine
#                      version), built from its sdist with its own default flags
#   venv-diffusers     diffusers + PyTorch (CPU) for the reference pipeline
# Usage: benchmarks/setup_external.sh [sdcpp-python] [diffusers]   (default: both)
# TORCH_WHEEL=/path/to/torch.whl installs PyTorch from a local file.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SDCPP_PY_BENCH_CACHE:-$here/cache}
mkdir -p "$cache"
want=("$@"); ((${#want[@]})) || want=(sdcpp-python diffusers)
for tool in "${want[@]}"; do
    case $tool in
    sdcpp-python)
        python3 -m venv "$cache/venv-sdcpp-python"
        # ccache only caches the compiler; the flags are the package's own defaults
        command -v ccache >/dev/null && export CMAKE_C_COMPILER_LAUNCHER=ccache CMAKE_CXX_COMPILER_LAUNCHER=ccache
        "$cache/venv-sdcpp-python/bin/pip" install -q "stable-diffusion-cpp-python==0.4.7" numpy pillow
        ;;
    diffusers)
        python3 -m venv "$cache/venv-diffusers"
        torch=${TORCH_WHEEL:-torch}
        "$cache/venv-diffusers/bin/pip" install -q "$torch" diffusers transformers accelerate safetensors gguf numpy pillow
        ;;
    *) echo "unknown tool $tool (sdcpp-python, diffusers)" >&2; exit 2 ;;
    esac
    echo "$tool ready in $cache"
done
