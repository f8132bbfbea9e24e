"""The VAE decode (issue 24), side by side in one run: sdcpp-py's decode of a random latent
(FLUX.1's VAE for Z-Image, FLUX.2's for Klein), each VAE weight setting in its own process,
beside diffusers' decode of the same VAE configuration in BF16 and FP32, at each size; the
seconds per decode, the process's peak RSS, and the goal (<= 1.0x diffusers' BF16 decode)
as ratios.

The sdcpp-py processes load the full-size VAE with the family's tiny synthetic DiT and text
encoder, so their peak RSS is the VAE's weights and its decode buffers, as the diffusers
processes hold the VAE alone.

    python benchmarks/run.py --suites vae [--vae-sizes 512,1024]
    python benchmarks/vae_suite.py --child spec.json     # one sdcpp-py process (the suite runs it)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import VENV_DIFFUSERS, run_diffusers  # noqa: E402
from harness import emit, ratio, run_script  # noqa: E402

# key: (context settings, label)
CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "f16": ({}, "F16 weights (default): the CPU's row-wise direct convolution"),
    "bf16": ({"vae_weights": "bf16"}, "BF16 weights (`vae_weights=\"bf16\"`)"),
}
PEER_DTYPES = ("bfloat16", "float32")
LATENT = {"z-image-turbo": (16, 8), "flux2-klein": (128, 16)}   # our latents: channels, pixels per cell

ModelsFor = Callable[[str, str], Any]   # (family, "tiny" | "full") -> SyntheticModelSet


def _sdcpp(family: str, key: str, size: int, models_for: ModelsFor, args: Any, work: Path) -> dict[str, Any]:
    tiny, full = models_for(family, "tiny"), models_for(family, "tiny" if args.quick else "full")
    spec = {"files": {"diffusion_model": str(tiny.diffusion_model), "llm": str(tiny.llm), "vae": str(full.vae)},
            "context": {"n_threads": args.threads, **CONFIGS[key][0]}, "family": family, "size": size,
            "decodes": 2}
    r = run_script("vae_suite.py", spec, work, f"{family}-{size}-sdcpp-{key}")
    return {"family": family, "size": size, "config": key, "decode_s": r.report["decode_s"],
            "decodes_s": r.report["decodes_s"], "cpu_variant": r.report["cpu_variant"],
            "peak_rss_mb": round(r.peak_rss_mb)}


def _peer(family: str, size: int, dtype: str, args: Any, work: Path) -> dict[str, Any]:
    base = {"family": family, "size": size, "config": f"diffusers-{dtype}"}
    if not VENV_DIFFUSERS.exists():
        return {**base, "skipped": "diffusers not set up: run benchmarks/setup_external.sh diffusers"}
    spec = {"job": "vae", "family": family, "width": size, "height": size, "dtype": dtype, "threads": args.threads,
            "decodes": 2 if size <= 512 else 1}   # after a warm-up decode
    tag = f"{family}-{size}-diffusers-{dtype}"
    r = run_diffusers(spec, work, tag)
    if isinstance(r, str):
        return {**base, "skipped": r}
    return {**base, "decode_s": r.report["decode_s"], "decodes_s": r.report["decodes_s"],
            "torch": r.report["torch"], "peak_rss_mb": round(r.peak_rss_mb)}


def run(families: list[str], models_for: ModelsFor, args: Any, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    sizes = [64] if args.quick else [int(s) for s in args.vae_sizes.split(",")]
    rows: list[dict[str, Any]] = []
    for family in families:
        for size in sizes:
            for key in CONFIGS:
                rows.append(_sdcpp(family, key, size, models_for, args, work))
            if not args.quick:
                rows += [_peer(family, size, dtype, args, work) for dtype in PEER_DTYPES
                         if dtype == "bfloat16" or size <= 512]   # FP32 at 1 MP: minutes, and no goal
    return {"rows": rows, "goals": goals(rows)}


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each sdcpp-py row against diffusers' BF16 decode of the same family and size."""
    peers = {(r["family"], r["size"]): r for r in rows if r["config"] == "diffusers-bfloat16" and "decode_s" in r}
    out = []
    for r in rows:
        peer = peers.get((r["family"], r["size"]))
        if r["config"] in CONFIGS and peer is not None:
            x = ratio(r["decode_s"], peer["decode_s"])
            out.append({"family": r["family"], "size": r["size"], "config": r["config"], "vs_bf16": x,
                        "rss_vs_bf16": ratio(r["peak_rss_mb"], peer["peak_rss_mb"]), "met": x <= 1.0})
    return out


def markdown(res: dict[str, Any]) -> list[str]:
    md = ["## VAE decode", "", "| family | size | setting | decode s | peak RSS MB | vs diffusers BF16 |",
          "|---|---|---|---|---|---|"]
    by = {(g["family"], g["size"], g["config"]): g for g in res["goals"]}
    for r in res["rows"]:
        label = CONFIGS[r["config"]][1] if r["config"] in CONFIGS else r["config"].replace("-", " ")
        if "skipped" in r:
            md.append(f"| {r['family']} | {r['size']} | {label} | skipped: {r['skipped']} | | |")
            continue
        g = by.get((r["family"], r["size"], r["config"]))
        goal = f"{g['vs_bf16']}x ({'met' if g['met'] else 'not met'})" if g else ""
        md.append(f"| {r['family']} | {r['size']} | {label} | {r['decode_s']:.2f} | {r['peak_rss_mb']} | {goal} |")
    return md + [""]


def child(spec_path: str) -> None:
    import numpy as np

    import sdcpp_py
    from sdcpp_py import Pipeline
    from sdcpp_py.staged import Latent

    spec = json.loads(Path(spec_path).read_text())
    channels, cell = LATENT[spec["family"]]
    size = spec["size"]
    with Pipeline(**spec["files"], **spec["context"]) as pipe:
        data = np.random.default_rng(0).standard_normal((1, channels, size // cell, size // cell)).astype(np.float32)
        latent = Latent(data, pipe.family, cell)
        times = []
        for _ in range(spec["decodes"]):
            t0 = time.perf_counter()
            pipe.decode(latent)
            times.append(time.perf_counter() - t0)
    emit({"decode_s": min(times), "decodes_s": times, "cpu_variant": sdcpp_py.system_info()["cpu_variant"]})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        sys.exit("run through benchmarks/run.py --suites vae (or: vae_suite.py --child SPEC)")
