"""DiT step time per CPU module (ggml CPU variant) and weight type, side by side in one run;
and the Vulkan backend (lavapipe here) against the CPU as a correctness figure.

    python benchmarks/cpu_variants.py                      # Z-Image layout, 64x64, 2 steps
    python benchmarks/cpu_variants.py --quick              # tiny model, seconds

Each configuration runs in its own process (a process loads one CPU module), with the
same synthetic files, alternating the variants so that drift on a shared machine hits
them alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CACHE, emit, machine_info, ratio, run_child, write_results  # noqa: E402

PROMPT = "a red fox in the snow, morning light"


def child(args: argparse.Namespace) -> None:
    import numpy as np

    import sdcpp_py
    from sdcpp_py import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline(diffusion_model=args.dit, llm=args.llm, vae=args.vae, n_threads=args.threads,
                    backend=args.backend)
    load_s = time.perf_counter() - t0
    cond = pipe.encode(PROMPT)
    latent = pipe.denoise(cond, width=args.width, height=args.height, steps=args.steps, seed=7)
    image = pipe.decode(latent, output_type="np")
    np.save(args.out, image)
    info = sdcpp_py.system_info()
    emit({"variant": info["cpu_variant"], "device": pipe.device, "load_s": load_s,
          "encode_s": cond.seconds, "denoise_s": latent.info["denoise_s"],
          "step_s": latent.info["denoise_s"] / args.steps})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--family", default="z-image-turbo", choices=["z-image-turbo", "flux2-klein"])
    ap.add_argument("--variants", default="haswell,best", help="comma list; 'best' = what ggml picks")
    ap.add_argument("--types", default="q4_0,q8_0,f16", help="DiT weight types")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vulkan", action="store_true", help="also run on Vulkan (lavapipe: set GGML_VK_VISIBLE_DEVICES=0)")
    for hidden in ("--child", "--dit", "--llm", "--vae", "--out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0

    import numpy as np

    from sdcpp_py.synthetic import write_model_set

    size = "tiny" if args.quick else "full"
    me = [sys.executable, str(Path(__file__).resolve())]
    shape = ["--width", str(args.width), "--height", str(args.height), "--steps", str(args.steps),
             "--threads", str(args.threads)]
    rows: List[Dict[str, Any]] = []
    images: Dict[str, Any] = {}
    for wtype in args.types.split(","):
        m = write_model_set(args.family, CACHE / "synthetic", size=size, dit_type=wtype, llm_type="q4_0")
        files = ["--dit", str(m.diffusion_model), "--llm", str(m.llm), "--vae", str(m.vae)]
        configs = [(v, "cpu") for v in args.variants.split(",")] + ([("best", "vulkan")] if args.vulkan else [])
        for variant, backend in configs:
            out = CACHE / "images" / f"variant-{wtype}-{variant}-{backend}.npy"
            out.parent.mkdir(parents=True, exist_ok=True)
            env = {} if variant == "best" else {"SDCPP_PY_CPU_VARIANT": variant}
            if backend == "vulkan":
                env["GGML_VK_VISIBLE_DEVICES"] = os.environ.get("GGML_VK_VISIBLE_DEVICES", "0")
            r = run_child(me + ["--child", "1", "--backend", backend, "--out", str(out)] + files + shape, env=env)
            rows.append({"type": wtype, "variant": r.report["variant"], "requested": variant, "backend": backend,
                         "device": r.report["device"], "step_s": round(r.report["step_s"], 3),
                         "engine_denoise_s": r.stages.get("denoise_s"), "load_s": round(r.report["load_s"], 2),
                         "peak_rss_mb": round(r.peak_rss_mb)})
            images[f"{wtype}/{variant}/{backend}"] = np.load(out).astype(int)

    comparisons = []
    for wtype in args.types.split(","):
        ref = next(r for r in rows if r["type"] == wtype and r["requested"] == args.variants.split(",")[0])
        for r in rows:
            if r["type"] != wtype or r is ref:
                continue
            a, b = images[f"{wtype}/{ref['requested']}/cpu"], images[f"{wtype}/{r['requested']}/{r['backend']}"]
            comparisons.append({"type": wtype, "baseline": ref["variant"], "other": f"{r['variant']}/{r['device']}",
                                "speedup": ratio(ref["step_s"], r["step_s"]),
                                "pixel_diff_max": int(np.abs(a - b).max()),
                                "pixel_diff_mean": round(float(np.abs(a - b).mean()), 3)})
    data = {"benchmark": "cpu_variants", "size": size, "args": vars(args), "machine": machine_info(),
            "runs": rows, "comparisons": comparisons}
    md = [f"# DiT step time by CPU variant: {args.family} ({size}), {args.width}x{args.height}, "
          f"{args.steps} steps, {args.threads} threads", "",
          "| DiT type | variant | device | s/step | load s | peak RSS MB |", "|---|---|---|---|---|---|"]
    md += [f"| {r['type']} | {r['variant']} | {r['device']} | {r['step_s']} | {r['load_s']} | {r['peak_rss_mb']} |"
           for r in rows]
    md += ["", "| DiT type | baseline | other | speed-up | max px diff | mean px diff |", "|---|---|---|---|---|---|"]
    md += [f"| {c['type']} | {c['baseline']} | {c['other']} | **{c['speedup']}x** | {c['pixel_diff_max']} | "
           f"{c['pixel_diff_mean']} |" for c in comparisons]
    text = "\n".join(md) + "\n"
    path = write_results("cpu_variants", data, text)
    print(text)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
