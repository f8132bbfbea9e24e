"""Which weights to convert to F16 at load time.

On a CPU the engine's F16 matmuls (llamafile sgemm) run 2-3x faster than its
Q4_0/Q8_0 ones at the token counts of real images (benchmarks/README.md), so a
quantized file is best used as a small download that is expanded to F16 in
memory, where memory allows. ``upcast="auto"`` (the default) does that on the
CPU backend for the diffusion model first, then the text encoder, as long as the
expanded weights plus everything else fit in the memory available now with a
margin; on a GPU backend it keeps the files' types (VRAM is the scarce thing
there and quantized kernels are fast). The engine applies the plan through its
``tensor_type_rules`` (regular expressions on its tensor names).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from .modelfile import GGML_TYPES, SAFETENSORS_DTYPES, ModelFile, inspect

logger = logging.getLogger(__name__)

UPCAST_CHOICES = ("auto", "none", "diffusion", "all")

# engine tensor-name prefixes of the components (stable-diffusion.cpp's loader)
RULE_PREFIX = {"diffusion": r"^model\.diffusion_model\.", "encoder": r"^text_encoders\."}
COMPONENT_FILES = {"diffusion": ("diffusion_model", "model"), "encoder": ("llm",)}

MARGIN_BYTES = 2 << 30    # activations, compute buffers, the VAE's work area
MARGIN_FRACTION = 0.10    # of what is available, for everything else on the machine

# names the engine keeps in their file type whatever the rules say (model.cpp,
# tensor_should_be_converted): biases, scales, embeddings, FLUX in/out layers
_KEPT = re.compile(r"(\.bias$|\.scale$|img_in\.|txt_in\.|time_in\.|vector_in\.|guidance_in\.|final_layer\.|"
                   r"x_embedder\.|t_embedder\.|y_embedder\.|pos_embed|context_embedder\.|embedding)")
_ELEMENT_BYTES = {name: size / block for name, block, size in GGML_TYPES.values()}
_ELEMENT_BYTES.update(SAFETENSORS_DTYPES)
_WIDE = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}   # nothing to gain from F16


@dataclass(frozen=True)
class Growth:
    """What converting one file's quantized tensors to F16 would cost."""

    file_bytes: int       # the tensors' bytes as stored
    extra_bytes: int      # added bytes once the convertible ones are F16
    tensors: int          # how many would be converted


@dataclass(frozen=True)
class UpcastPlan:
    components: Tuple[str, ...]   # "diffusion", "encoder"
    rules: str                    # for sd_ctx_params_t.tensor_type_rules ("" = none)
    extra_bytes: int
    reason: str


def growth(f: ModelFile) -> Growth:
    stored = extra = count = 0
    for t in f.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        nbytes = int(n * _ELEMENT_BYTES.get(t.dtype, 2))
        stored += nbytes
        if t.dtype in _WIDE or t.dtype == "BF16" or len(t.shape) < 2 or _KEPT.search(t.name):
            continue
        extra += 2 * n - nbytes
        count += 1
    return Growth(stored, max(extra, 0), count)


def available_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def rules_for(components: Tuple[str, ...]) -> str:
    return ",".join(f"{RULE_PREFIX[c]}=f16" for c in components)


def plan_upcast(policy: str, paths: Dict[str, Optional[Path]], *, on_cpu: bool, wtype: Optional[str],
                available: Optional[int] = None) -> UpcastPlan:
    """Decide what ``policy`` means for these files on this machine."""
    if policy == "none" or wtype is not None:
        return UpcastPlan((), "", 0, "off" if policy == "none" else f"wtype={wtype} converts everything")
    files = {role: inspect(p) for role, p in paths.items() if p is not None}
    grow = {c: next((growth(files[r]) for r in roles if r in files), Growth(0, 0, 0))
            for c, roles in COMPONENT_FILES.items()}
    wanted = [c for c in ("diffusion", "encoder") if grow[c].tensors]
    if policy == "diffusion":
        wanted = [c for c in wanted if c == "diffusion"]
    if policy in ("diffusion", "all"):
        chosen = tuple(wanted)
        return UpcastPlan(chosen, rules_for(chosen), sum(grow[c].extra_bytes for c in chosen), f"upcast={policy}")
    if not on_cpu:
        return UpcastPlan((), "", 0, "auto: GPU backend keeps the files' types")
    if not wanted:
        return UpcastPlan((), "", 0, "auto: no quantized weights")
    avail = available_memory() if available is None else available
    if avail is None:
        return UpcastPlan((), "", 0, "auto: available memory unknown")
    resident = sum(g.file_bytes for g in (growth(f) for f in files.values()))
    budget = avail * (1 - MARGIN_FRACTION) - MARGIN_BYTES - resident
    chosen_list = []
    for c in wanted:
        if grow[c].extra_bytes <= budget:
            chosen_list.append(c)
            budget -= grow[c].extra_bytes
    chosen = tuple(chosen_list)
    extra = sum(grow[c].extra_bytes for c in chosen)
    gib = 1 << 30
    reason = (f"auto: {avail / gib:.1f} GiB available, files {resident / gib:.1f} GiB, "
              f"F16 {' + '.join(chosen) or 'nothing'} adds {extra / gib:.1f} GiB")
    return UpcastPlan(chosen, rules_for(chosen), extra, reason)
