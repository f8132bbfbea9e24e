"""Settings that change speed: weight types (the file's, or expanded to F16 at load),
threads, CPU variant, flash attention, direct convolutions in the VAE. Each
configuration is one process on the same files, one image; the table gives every
stage so the fastest setting per stage can be read off, and the comparison with the
package defaults says whether a default should change.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import ratio, run_spec

PROMPT = "a red fox in the snow, morning light"

# (label, DiT file type, context settings, environment)
FULL_CONFIGS: list[tuple[str, str, dict[str, Any], dict[str, str]]] = [
    ("defaults (Q4_0 file)", "q4_0", {}, {}),
    ("Q4_0 as stored, plain kernels (repack=none, upcast=none)", "q4_0", {"upcast": "none", "repack": "none"}, {}),
    ("Q4_0 file, DiT expanded to F16", "q4_0", {"upcast": "diffusion", "upcast_type": "f16"}, {}),
    ("Q4_0 file, DiT expanded to BF16", "q4_0", {"upcast": "diffusion", "upcast_type": "bf16"}, {}),
    ("Q8_0 file (defaults)", "q8_0", {}, {}),
    ("Q8_0 file, no upcast", "q8_0", {"upcast": "none"}, {}),
    ("F16 file", "f16", {}, {}),
    ("defaults + flash attention", "q4_0", {"flash_attn": True}, {}),
    ("defaults + VAE direct conv", "q4_0", {"vae_conv_direct": True}, {}),
    ("defaults, haswell (AVX2) module", "q4_0", {}, {"SDCPP_PY_CPU_VARIANT": "haswell"}),
    ("defaults, 1 thread", "q4_0", {"n_threads": 1}, {}),
    ("defaults + release encoder/diffusion", "q4_0", {"release_encoder": True, "release_diffusion": True}, {}),
    ("defaults + BF16 VAE weights", "q4_0", {"vae_weights": "bf16"}, {}),
]


def run(family: str, models_for: Callable[[str], Any], args, work: Path) -> dict[str, Any]:
    """models_for(dit_type) gives the synthetic set with that DiT weight type (written on first use)."""
    rows = []
    wanted = set(args.knobs.split(",")) if args.knobs else None
    for n, (label, dit_type, context, env) in enumerate(FULL_CONFIGS):
        if (wanted is not None and str(n) not in wanted and label not in wanted) or (args.quick and dit_type == "q8_0"):
            continue
        models = models_for(dit_type)
        spec = {"files": {"diffusion_model": models.diffusion_model, "llm": models.llm, "vae": models.vae},
                "context": {"n_threads": args.threads, **context}, "prompt": PROMPT, "tag": f"knob{n}",
                "items": [{"width": args.width, "height": args.height, "steps": args.steps, "seed": 7}]}
        r = run_spec(spec, work, f"{family}-knob{n}", env=env)
        item = r.report["items"][0]
        rows.append({"label": label, "dit_file": dit_type, "context": context, "env": env,
                     "load_s": round(r.report["load_s"], 2), "encode_s": round(r.report["encode_s"], 2),
                     "step_s": round(item["step_s"], 2), "decode_s": round(item["decode_s"], 2),
                     "wall_s": round(r.wall_s, 2), "peak_rss_mb": round(r.peak_rss_mb),
                     "upcast": r.report["upcast"], "cpu_variant": r.report["cpu_variant"],
                     "weights": r.report.get("weights", {}),
                     "threads": r.report["threads"]})
    base = rows[0] if rows and rows[0]["label"].startswith("defaults") else None
    for row in rows:
        if base:
            row["step_speedup_vs_defaults"] = ratio(base["step_s"], row["step_s"])
    best = {stage: min(rows, key=lambda r: r[stage])["label"] for stage in ("load_s", "encode_s", "step_s", "decode_s")} if rows else {}
    return {"family": family, "rows": rows, "fastest": best}


def _buffers(row: dict[str, Any]) -> str:
    dit = row.get("weights", {}).get("buffers", {}).get("diffusion", {})
    return " + ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(dit.items())) or "-"


def markdown(res: dict[str, Any], args) -> list[str]:
    md = [f"### {res['family']}: {args.width}x{args.height}, {args.steps} step(s), one image per process", "",
          "| setting | load s | encode s | DiT step s | VAE decode s | wall s | peak RSS MB | step speed-up | expanded | DiT buffers MB |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        md.append(f"| {r['label']} | {r['load_s']} | {r['encode_s']} | {r['step_s']} | {r['decode_s']} | "
                  f"{r['wall_s']} | {r['peak_rss_mb']} | {r.get('step_speedup_vs_defaults', '')} | "
                  f"{', '.join(r['upcast']) or '-'} | {_buffers(r)} |")
    md += ["", "Fastest per stage: " + ", ".join(f"{k[:-2]}: {v}" for k, v in res["fastest"].items()), ""]
    return md
