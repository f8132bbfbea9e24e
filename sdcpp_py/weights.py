"""The weight policy: what each model's matrix weights become in memory.

Two levers, both applied by the engine while it loads:

- **kernels**: on the CPU backend, matmul weights of a type ggml has repacked
  or AMX kernels for are placed in those kernels' buffers (``repack``); the
  file's type is kept, only the layout changes;
- **expansion** (``upcast``): quantized weights without a fast kernel on this CPU
  are expanded to BF16 (where the CPU module has native BF16) or F16, through the
  engine's ``tensor_type_rules``.

``upcast="auto"`` decides from the files' types, the settings, the CPU module and
the machine's *total* memory only, never from what happens to be free at load,
so the same files and seed give the same pixels on the same machine. The plan,
and after load the buffers each component really lives in, are reported
(``Pipeline.weights``, every ``GenerationResult.weights``).

Speeds behind the defaults (benchmarks/README.md, "Kernels and the weight policy"; full
steps of both families, 2 threads):

- repackable types (Q4_0, Q4_K, IQ4_NL) are kept, in the repacked layout. On
  ``sapphirerapids`` a repacked Q4_0 step is as fast as an expanded one (1.03x the
  time); on ``zen4`` BF16 expansion is faster, by 1.10-1.13x at the native sizes (Z-Image
  1024x1024, Klein 512x512) and up to 1.35x at 256x256, for 1.6-2.2x the peak memory and
  2-3x the load time: at 1 MP the expanded Z-Image peaks at 21.6 GB, 92% of a 24 GB
  machine. Keeping is the default; ``upcast="diffusion"`` is the one setting for the rest.
- Q8_0, Q5_K, Q6_K and the legacy types have no repacked x86 kernel in ggml 0.9.8 and
  are expanded where memory allows (``zen4``: Q8_0 as stored 1.63x slower than expanded),
  unless ``MEASURED`` says otherwise for the CPU module.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .modelfile import GGML_TYPES, SAFETENSORS_DTYPES, ModelFile, TensorInfo, inspect

logger = logging.getLogger(__name__)

UPCAST_CHOICES = ("auto", "none", "diffusion", "all")
UPCAST_TYPES = ("auto", "f16", "bf16")
REPACK_CHOICES = ("auto", "none")
# what each repack setting lets the engine use (its sd_cpu_weight_buffers). ggml's AMX
# buffer type is left out: its kernels died with SIGILL on a KVM Sapphire Rapids guest
# that reports AMX (benchmarks/README.md), and a process death is not a speed trade.
NATIVE_BUFFERS = {"auto": "CPU_REPACK", "none": ""}

# engine tensor-name prefixes of the components (stable-diffusion.cpp's loader)
# The encoder's token embedding stays as stored: it is read by GET_ROWS, which has no BF16
# kernel (the engine would widen it to F32: +1.5 GB for Qwen3-4B), and it is no matmul.
RULE_PREFIX = {"diffusion": r"^model\.diffusion_model\.",
               "encoder": r"^text_encoders\.(?!.*(embed_tokens|token_embd|token_embedding))"}
COMPONENT_FILES = {"diffusion": ("diffusion_model", "model"), "encoder": ("llm",)}
# vae_weights="bf16": the VAE's convolution weights (not its norms) in BF16, which the engine
# honours for CPU contexts (vendor/patches/0014) so its convolutions (patches/0017) run BF16 dot
# products: decodes 1.4-1.6x faster than F16 on a Zen 5, 0.3-0.4 levels mean difference from
# F16 on the synthetic VAEs (benchmarks/README.md).
VAE_BF16_RULE = r"^first_stage_model\.(?!.*norm).*\.weight$=bf16"

MEMORY_FRACTION = 0.80    # of the machine's total memory, for weights and work
MARGIN_BYTES = 2 << 30    # activations, compute buffers, the VAE's work area

# names the engine keeps in their file type whatever the rules say (model.cpp,
# tensor_should_be_converted): biases, scales, embeddings, FLUX in/out layers
_KEPT = re.compile(r"(\.bias$|\.scale$|img_in\.|txt_in\.|time_in\.|vector_in\.|guidance_in\.|final_layer\.|"
                   r"x_embedder\.|t_embedder\.|y_embedder\.|pos_embed|context_embedder\.|embedding|embed_tokens|"
                   r"token_embd)")
_ELEMENT_BYTES = {name: size / block for name, block, size in GGML_TYPES.values()}
_ELEMENT_BYTES.update(SAFETENSORS_DTYPES)
_WIDE = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}   # nothing to gain

# ggml 0.9.8's x86 kernels behind the CPU backend's extra buffer types
# (ggml-cpu/repack.cpp ggml_repack_get_optimal_repack_type, amx/common.h)
_REPACK_TYPES = {"Q4_0": "AVX2", "Q4_K": "AVX2", "IQ4_NL": "AVX2", "MXFP4": "AVX2", "Q2_K": "AVX512"}
_AMX_TYPES = {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}

# Measured exceptions to "a fast kernel is kept, anything else quantized is expanded", per
# (CPU module, type): "keep" where the type as stored steps as fast as expanded, "expand"
# where expansion wins despite a kernel by more than its memory is worth (none so far).
# benchmarks/README.md (Z-Image layout, 256x256, 2 threads): on sapphirerapids Q8_0 as
# stored 21.3 s/step against 20.9 s expanded to BF16, at 9.2 GB peak instead of 14.7 GB;
# on zen4 18.0 against 11.1 s, so the rule's expansion stands there.
MEASURED: dict[tuple[str, str], str] = {("sapphirerapids", "Q8_0"): "keep"}


@dataclass(frozen=True)
class CpuKernels:
    """What the loaded CPU module offers for weights."""

    variant: str                       # ggml's module name ("sapphirerapids", "zen4", ...)
    features: frozenset[str]           # instruction sets it reports
    buffers: tuple[str, ...]           # its extra buffer types, in the order weights are offered

    @property
    def native_bf16(self) -> bool:
        return "AVX512_BF16" in self.features

    def kernel_for(self, dtype: str, repack: str) -> str | None:
        """The extra buffer a weight of ``dtype`` would be placed in under ``repack``."""
        allowed = NATIVE_BUFFERS[repack].split(",")
        for buf in self.buffers:
            if buf not in allowed:
                continue
            if buf == "AMX" and dtype in _AMX_TYPES:
                return buf
            if buf == "CPU_REPACK" and dtype in _REPACK_TYPES and _REPACK_TYPES[dtype] in self.features:
                return buf
        return None


def total_memory() -> int | None:
    """MemTotal from /proc/meminfo (the machine, not what is free now), in bytes."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        return pages * os.sysconf("SC_PAGE_SIZE") if pages > 0 else None
    m = re.search(r"^MemTotal:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


@dataclass(frozen=True)
class Growth:
    """What expanding one file's quantized matrices to 16 bits would cost."""

    file_bytes: int       # all its tensors' bytes as stored
    extra_bytes: int      # added bytes once the expandable ones are 16-bit
    tensors: int          # how many would be expanded


def _nbytes(t: TensorInfo) -> tuple[int, int]:
    n = 1
    for d in t.shape:
        n *= d
    return n, int(n * _ELEMENT_BYTES.get(t.dtype, 2))


def _expandable(t: TensorInfo) -> bool:
    return not (t.dtype in _WIDE or len(t.shape) < 2 or _KEPT.search(t.name))


def growth(f: ModelFile) -> Growth:
    stored = extra = count = 0
    for t in f.tensors.values():
        n, nbytes = _nbytes(t)
        stored += nbytes
        if _expandable(t):
            extra += 2 * n - nbytes
            count += 1
    return Growth(stored, max(extra, 0), count)


def matrix_type(f: ModelFile) -> str | None:
    """The type holding most bytes among a file's matrix weights (None: no matrices)."""
    by_type: dict[str, int] = {}
    for t in f.tensors.values():
        if len(t.shape) >= 2 and not _KEPT.search(t.name):
            by_type[t.dtype] = by_type.get(t.dtype, 0) + _nbytes(t)[1]
    return max(by_type, key=lambda k: by_type[k]) if by_type else None


@dataclass(frozen=True)
class ComponentPlan:
    """What one component's matrix weights become."""

    file_type: str | None     # the type of most of its matrix weights in the file
    memory_type: str | None   # ... and in memory
    kernel: str                  # "CPU_REPACK", "AMX" or "plain" (the engine's ordinary kernels)
    reason: str


@dataclass(frozen=True)
class WeightPlan:
    """The weight policy's decision for one set of files on this machine."""

    components: tuple[str, ...]       # expanded components ("diffusion", "encoder")
    rules: str                        # for sd_ctx_params_t.tensor_type_rules ("" = none)
    extra_bytes: int                  # bytes the expansion adds
    reason: str
    target: str = "f16"               # the expanded type
    native_buffers: str = ""          # the engine's sd_cpu_weight_buffers
    per_component: Mapping[str, ComponentPlan] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["components"] = list(self.components)
        return d


def rules_for(components: Sequence[str], target: str = "f16") -> str:
    return ",".join(f"{RULE_PREFIX[c]}={target}" for c in components)


def plan_weights(policy: str, paths: dict[str, Path | None], *, on_cpu: bool, wtype: str | None,
                 repack: str = "auto", target: str = "auto", kernels: CpuKernels | None = None,
                 memory: int | None = None) -> WeightPlan:
    """Decide what ``policy`` means for these files on this machine (deterministic); ``kernels``: the
    loaded CPU module's (``backends.cpu_kernels()``), None for a GPU backend."""
    files = {role: inspect(p) for role, p in paths.items() if p is not None}
    comp_file = {c: next((files[r] for r in roles if r in files), None) for c, roles in COMPONENT_FILES.items()}
    buffers = NATIVE_BUFFERS[repack] if on_cpu else ""
    if target == "auto":
        target = "bf16" if kernels is not None and kernels.native_bf16 else "f16"

    def kernel(dtype: str | None) -> str | None:
        return kernels.kernel_for(dtype, repack) if (kernels is not None and dtype and buffers) else None

    types = {c: (matrix_type(f) if f is not None else None) for c, f in comp_file.items()}
    grow = {c: growth(f) if f is not None else Growth(0, 0, 0) for c, f in comp_file.items()}

    def describe(chosen: Sequence[str], why: dict[str, str]) -> dict[str, ComponentPlan]:
        out = {}
        for c, dtype in types.items():
            if comp_file[c] is None:
                continue
            if c in chosen:
                out[c] = ComponentPlan(dtype, target.upper(), "plain", why.get(c, f"expanded to {target}"))
            else:
                mem = wtype.upper() if wtype else dtype
                k = kernel(mem)
                out[c] = ComponentPlan(dtype, mem, k or "plain", why.get(c, "kept"))
        return out

    if policy == "none" or wtype is not None:
        reason = "upcast=none" if policy == "none" else f"wtype={wtype} converts everything"
        return WeightPlan((), "", 0, reason, target, buffers, describe((), {}))
    wanted = [c for c in ("diffusion", "encoder") if grow[c].tensors]
    if policy in ("diffusion", "all"):
        chosen = tuple(c for c in wanted if policy == "all" or c == "diffusion")
        return WeightPlan(chosen, rules_for(chosen, target), sum(grow[c].extra_bytes for c in chosen),
                          f"upcast={policy}", target, buffers, describe(chosen, {}))
    if not on_cpu:
        return WeightPlan((), "", 0, "auto: a GPU backend keeps the files' types", target, "",
                          describe((), {c: "GPU backend" for c in types}))
    why: dict[str, str] = {}
    candidates = []
    for c in wanted:
        dtype = types[c]
        k = kernel(dtype)
        measured = MEASURED.get((kernels.variant if kernels else "", dtype or ""))
        if k is not None and measured != "expand":
            why[c] = f"{dtype} runs on {k} kernels: kept"
        elif measured == "keep":
            why[c] = f"{dtype} as stored measured as fast as expanded on {kernels.variant if kernels else 'cpu'}: kept"
        elif dtype in _WIDE or dtype is None:
            why[c] = f"{dtype}: kept"
        else:
            candidates.append(c)
    mem = total_memory() if memory is None else memory
    resident = sum(growth(f).file_bytes for f in files.values())
    budget = (mem * MEMORY_FRACTION - MARGIN_BYTES - resident) if mem is not None else -1
    chosen_list = []
    for c in candidates:
        if grow[c].extra_bytes <= budget:
            chosen_list.append(c)
            budget -= grow[c].extra_bytes
            why[c] = f"{types[c]} has no fast kernel here: expanded to {target}"
        else:
            why[c] = f"{types[c]} has no fast kernel here, but {target} does not fit {_gib(mem)} GiB: kept"
    chosen = tuple(chosen_list)
    extra = sum(grow[c].extra_bytes for c in chosen)
    reason = (f"auto on {kernels.variant if kernels else 'cpu'} ({_gib(mem)} GiB total): "
              + "; ".join(f"{c}: {why[c]}" for c in ("diffusion", "encoder") if c in why))
    return WeightPlan(chosen, rules_for(chosen, target), extra, reason, target, buffers, describe(chosen, why))


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 30):.1f}"


def parse_buffers(text: str) -> dict[str, int]:
    """The shim's "CPU=123,CPU_REPACK=456" as a dict."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.rpartition("=")
        out[name] = int(value)
    return out
