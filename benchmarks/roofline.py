"""FLOPs of one DiT step, from the weights' shapes and the token counts, and the
machine's practical peak on the same GEMMs (fp32, numpy's BLAS, same cores).

A step's matmul FLOPs are 2 x rows x in x out for every weight matrix, where rows
is the number of tokens that pass through it (image tokens, text tokens, both, or
one vector for the modulation layers); attention adds 4 x tokens^2 x width per
attention layer (QK^T and PV). Element-wise work is left out: it is small next to
these and is not what a GEMM peak measures.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from sdcpp_py.modelfile import ModelFile, inspect

# which tokens go through a weight, by name (first match wins)
_ROUTES = {
    "z-image-turbo": [(r"adaLN|t_embedder|time", "one"), (r"noise_refiner|x_embedder|final_layer", "img"),
                      (r"context_refiner|cap_embedder", "txt"), (r"layers\.", "all")],
    "flux2-klein": [(r"modulation|time_in|guidance_in|adaLN", "one"), (r"img_|img_in|final_layer", "img"),
                    (r"txt_|txt_in", "txt"), (r"single_blocks", "all")],
}
# attention layers: (name of the layer's qkv weight, which tokens attend)
_ATTENTION = {
    "z-image-turbo": [(r"noise_refiner\.\d+\.attention\.qkv\.weight$", "img"),
                      (r"context_refiner\.\d+\.attention\.qkv\.weight$", "txt"),
                      (r"^layers\.\d+\.attention\.qkv\.weight$", "all")],
    "flux2-klein": [(r"double_blocks\.\d+\.img_attn\.qkv\.weight$", "all"),
                    (r"single_blocks\.\d+\.linear1\.weight$", "all")],
}


def _rows(route: str, img: int, txt: int) -> int:
    return {"one": 1, "img": img, "txt": txt, "all": img + txt}[route]


def gemm_shapes(f: ModelFile, family: str, img: int, txt: int) -> Counter:
    """(rows, in, out) of every weight matrix of one DiT step, with counts."""
    shapes: Counter = Counter()
    for name, t in f.tensors.items():
        if len(t.shape) != 2 or not name.endswith(".weight") or "norm" in name:
            continue
        bare = re.sub(r"^(model\.diffusion_model\.)", "", name)
        route = next((r for rx, r in _ROUTES[family] if re.search(rx, bare)), "all")
        out_f, in_f = t.shape
        shapes[(_rows(route, img, txt), in_f, out_f)] += 1
    return shapes


def step_flops(f: ModelFile, family: str, img: int, txt: int, width: int) -> dict[str, float]:
    matmul = sum(2.0 * r * i * o * n for (r, i, o), n in gemm_shapes(f, family, img, txt).items())
    attention = 0.0
    for name in f.tensors:
        bare = re.sub(r"^(model\.diffusion_model\.)", "", name)
        for rx, route in _ATTENTION[family]:
            if re.search(rx, bare):
                attention += 4.0 * _rows(route, img, txt) ** 2 * width
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def gemm_peak(shapes: Counter, *, reps: int = 2, budget_s: float = 20.0) -> dict[str, float]:
    """fp32 GFLOP/s of numpy on these GEMM shapes (each unique shape timed, best of reps),
    weighted by how often each occurs in a step."""
    rng = np.random.default_rng(0)
    flops = seconds = 0.0
    start = time.perf_counter()
    for (r, i, o), n in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2] * kv[1]):
        if r < 16:
            continue   # vector-matrix products: memory bound, not part of a GEMM peak
        a = rng.standard_normal((r, i), dtype=np.float32)
        b = rng.standard_normal((i, o), dtype=np.float32)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        flops += 2.0 * r * i * o * n
        seconds += best * n
        if time.perf_counter() - start > budget_s:
            break
    return {"gflops": flops / seconds / 1e9 if seconds else float("nan"), "measured_gflop": flops / 1e9}


def roofline(dit: Path, family: str, width: int, height: int, text_tokens: int, step_s: float) -> dict[str, float]:
    """Achieved GFLOP/s of a measured step against the fp32 GEMM peak of the same shapes."""
    f = inspect(dit)
    img = (width // 16) * (height // 16)
    embed = next(t for n, t in f.tensors.items() if n.endswith(("x_embedder.weight", "img_in.weight")))
    hidden = embed.shape[0]   # (out, in): the DiT's width
    fl = step_flops(f, family, img, text_tokens, hidden)
    peak = gemm_peak(gemm_shapes(f, family, img, text_tokens))
    achieved = fl["total"] / step_s / 1e9
    return {"image_tokens": img, "text_tokens": text_tokens, "step_gflop": fl["total"] / 1e9,
            "attention_share": fl["attention"] / fl["total"], "step_s": step_s, "achieved_gflops": achieved,
            "peak_gflops_fp32_gemm": peak["gflops"], "fraction_of_peak": achieved / peak["gflops"],
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default")}
