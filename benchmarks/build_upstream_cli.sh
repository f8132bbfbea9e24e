#!/usr/bin/env bash
# Build sd-cli from the pinned source the way its README says, with upstream's
# default flags (GGML_NATIVE on, llamafile sgemm off, ggml linked in statically):
# what the articles' readers run. The package's flags differ; benchmarks/run.py
# compares both. Output: $SDCPP_PY_BENCH_CACHE/upstream/bin/sd-cli
# (default benchmarks/cache). ccache is used when present.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cache=${SDCPP_PY_BENCH_CACHE:-$here/cache}
src=$root/vendor/stable-diffusion.cpp
[ -f "$src/CMakeLists.txt" ] || python3 "$root/vendor/materialize.py"
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
# The vendored tree leaves out upstream's examples/CMakeLists.txt (it pulls in the
# server example): a two-line parent project adds the library and sd-cli instead.
# Nothing else is set, so ggml keeps its own defaults (GGML_NATIVE=ON, no llamafile);
# WebP/WebM are off because their sources are not vendored (image I/O only).
mkdir -p "$cache/upstream-src"
cat > "$cache/upstream-src/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.18)
project(sd_upstream C CXX)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY \${CMAKE_BINARY_DIR}/bin)
set(SD_WEBP OFF CACHE BOOL "" FORCE)
set(SD_WEBM OFF CACHE BOOL "" FORCE)
add_subdirectory("$src" sd)
include_directories("$src/examples")
add_subdirectory("$src/examples/cli" cli)
CMAKE
cmake -S "$cache/upstream-src" -B "$cache/upstream" -DCMAKE_BUILD_TYPE=Release "${launcher[@]}"
cmake --build "$cache/upstream" --target sd-cli -j "$(nproc)"
ls -l "$cache/upstream/bin/sd-cli"
