"""N-seed sweep in one process (one load, one encoding) against N one-shot sd-cli runs,
and peak memory with the encoder/diffusion-model release options.

    python benchmarks/staged_sweep.py                 # FLUX.2 Klein 4B layout, 256x256, 1 step, 4 seeds
    python benchmarks/staged_sweep.py --quick         # tiny models, seconds (the smoke test runs this)

Everything runs in child processes (wall time and peak RSS from wait4), side by side
in one run, against the same synthetic files and the sd-cli built from the same
source with the same flags (install with SDCPP_PY_BUILD_CLI=ON).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CACHE, emit, machine_info, ratio, run_child, write_results  # noqa: E402

PROMPT = "a lighthouse on a rocky coast at dawn, oil painting, dramatic clouds"


def child(args: argparse.Namespace) -> None:
    """Runs inside the measured process: our sweep, or one image with release options."""
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
    logging.getLogger("sdcpp_py.native").setLevel(logging.INFO)
    from sdcpp_py import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline(diffusion_model=args.dit, llm=args.llm, vae=args.vae, n_threads=args.threads,
                    release_encoder=args.release, release_diffusion=args.release)
    load_s = time.perf_counter() - t0
    result = pipe.sweep(PROMPT, seeds=list(range(args.seeds)), steps=[args.steps],
                        sizes=[(args.width, args.height)])
    wall = time.perf_counter() - t0
    items = [{"seed": i.settings.seed, **i.timings} for i in result.items]
    for n, item in enumerate(result.items):
        item.image.save(Path(args.out) / f"ours-{args.child}-{n}.png")
    emit({"load_s": load_s, "encode_s": result.conditioning.seconds, "items": items, "wall_s": wall})
    pipe.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="flux2-klein", choices=["flux2-klein", "z-image-turbo"])
    ap.add_argument("--quick", action="store_true", help="tiny models: checks the harness in seconds")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dit-type", default="q4_0")
    ap.add_argument("--llm-type", default="q4_0")
    ap.add_argument("--no-memory", action="store_true", help="skip the release-option memory runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--release", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dit", help=argparse.SUPPRESS)
    ap.add_argument("--llm", help=argparse.SUPPRESS)
    ap.add_argument("--vae", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0

    from sdcpp_py.synthetic import write_model_set
    from sdcpp_py.system import sd_cli_path

    size = "tiny" if args.quick else "full"
    cli = sd_cli_path()
    if cli is None:
        print("sd-cli not found: install with SDCPP_PY_BUILD_CLI=ON (or set SDCPP_PY_SD_CLI)", file=sys.stderr)
        return 2
    models = write_model_set(args.family, CACHE / "synthetic", size=size, dit_type=args.dit_type,
                             llm_type=args.llm_type)
    out = CACHE / "images"
    out.mkdir(parents=True, exist_ok=True)
    files = ["--dit", str(models.diffusion_model), "--llm", str(models.llm), "--vae", str(models.vae)]
    common = ["--seeds", str(args.seeds), "--width", str(args.width), "--height", str(args.height),
              "--steps", str(args.steps), "--threads", str(args.threads), "--out", str(out)]
    me = [sys.executable, str(Path(__file__).resolve())]
    logs = CACHE / "logs"

    ours = run_child(me + ["--child", "sweep"] + files + common, log=logs / "ours-sweep.log")
    cli_runs = []
    for seed in range(args.seeds):
        cli_runs.append(run_child([str(cli), "--diffusion-model", str(models.diffusion_model), "--llm",
                                   str(models.llm), "--vae", str(models.vae), "-p", PROMPT, "-W", str(args.width),
                                   "-H", str(args.height), "--steps", str(args.steps), "--cfg-scale", "1",
                                   "-s", str(seed), "-t", str(args.threads), "-o", str(out / f"cli-{seed}.png")],
                                  log=logs / f"sd-cli-{seed}.log"))
    memory: Dict[str, Any] = {}
    if not args.no_memory:
        one = ["--seeds", "1"] + common[2:]
        resident = run_child(me + ["--child", "resident"] + files + one, log=logs / "ours-resident.log")
        released = run_child(me + ["--child", "released", "--release"] + files + one,
                             log=logs / "ours-released.log")
        memory = {"resident": resident.to_dict(), "released": released.to_dict(),
                  "peak_rss_ratio_released_vs_resident": ratio(released.peak_rss_mb, resident.peak_rss_mb)}

    cli_total = sum(r.wall_s for r in cli_runs)
    engine_stages = sum(ours.stages.values())
    inside = ours.report
    summary = {
        "sweep_wall_s": round(ours.wall_s, 2),
        "sd_cli_total_s": round(cli_total, 2),
        "speedup_vs_sd_cli": ratio(cli_total, ours.wall_s),
        "sweep_wall_inside_s": round(inside["wall_s"], 2),
        "engine_stage_sum_s": round(engine_stages, 2),
        "overhead_ratio": ratio(inside["wall_s"], engine_stages),
        "encodings": 1,
    }
    data = {"benchmark": "staged_sweep", "family": args.family, "size": size, "args": vars(args),
            "machine": machine_info(), "models": {k: str(v) for k, v in vars(models).items()},
            "ours": ours.to_dict(), "sd_cli": [r.to_dict() for r in cli_runs], "memory": memory,
            "summary": summary}
    md = [f"# Staged sweep: {args.family} ({size}), {args.width}x{args.height}, {args.steps} step(s), "
          f"{args.seeds} seeds, {args.threads} threads", "",
          "| run | wall s | load s | encode s | denoise s | decode s | peak RSS MB |", "|---|---|---|---|---|---|---|",
          f"| sdcpp-py sweep (1 process) | {ours.wall_s:.1f} | {ours.stages.get('load_s', 0):.1f} | "
          f"{ours.stages.get('encode_s', 0):.1f} | {ours.stages.get('denoise_s', 0):.1f} | "
          f"{ours.stages.get('decode_s', 0):.1f} | {ours.peak_rss_mb:.0f} |"]
    for seed, r in enumerate(cli_runs):
        md.append(f"| sd-cli seed {seed} | {r.wall_s:.1f} | {r.stages.get('load_s', 0):.1f} | "
                  f"{r.stages.get('encode_s', 0):.1f} | {r.stages.get('denoise_s', 0):.1f} | "
                  f"{r.stages.get('decode_s', 0):.1f} | {r.peak_rss_mb:.0f} |")
    md += ["", f"- N sd-cli runs / one sweep: **{summary['speedup_vs_sd_cli']}x** "
               f"({cli_total:.1f} s vs {ours.wall_s:.1f} s)",
           f"- sweep wall inside the process / sum of the engine's stage times: **{summary['overhead_ratio']}x**"]
    if memory:
        md.append(f"- peak RSS, one image: resident {memory['resident']['peak_rss_mb']:.0f} MB, with "
                  f"release_encoder+release_diffusion {memory['released']['peak_rss_mb']:.0f} MB "
                  f"(**{memory['peak_rss_ratio_released_vs_resident']}x**)")
    text = "\n".join(md) + "\n"
    path = write_results("staged_sweep", data, text)
    print(text)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
