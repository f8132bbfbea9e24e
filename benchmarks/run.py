"""The benchmark suite in one command: JSON with every raw figure, a markdown
summary, PNG plots and contact sheets.

    python benchmarks/run.py --quick        # tiny models, a few minutes (the smoke test runs this)
    python benchmarks/run.py                # full-size synthetic models of both families

Suites (``--suites``): compare (sdcpp-py vs sd-cli with the package's and upstream's
flags, stable-diffusion-cpp-python, diffusers), knobs (weight types, upcast, threads,
CPU variant, flash attention, VAE direct conv), roofline (DiT step GFLOP/s against an
fp32 GEMM of the same shapes), kernels (weights kept repacked or plain or
expanded to F16/BF16, at several sizes, against PyTorch's GEMM peak and diffusers, a
perf profile of a step, the weight policy's goals), vae (the VAE decode beside diffusers' in
BF16 and FP32), guide (the field guide's sweeps with contact sheets),
control (cancel latency in a step and in a VAE decode, isolation overhead, memory), server (HTTP
latency against an in-process generation, requests per minute from 4 clients), parity (LoRAs
at runtime and merged, step caches, ESRGAN upscaling).
Every measurement runs in a child process (wall time and peak RSS from wait4) on
files written once into the cache. See benchmarks/README.md for the setup of the
external tools and for results.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402
import control  # noqa: E402
import guide  # noqa: E402
import kernel_suite  # noqa: E402
import knobs  # noqa: E402
import parity  # noqa: E402
import serving  # noqa: E402
import sweeping  # noqa: E402
import vae_suite  # noqa: E402
from harness import CACHE, RESULTS, machine_info, run_spec, write_json  # noqa: E402
from roofline import roofline  # noqa: E402

FAMILIES = ("z-image-turbo", "flux2-klein")
SUITES = ("compare", "knobs", "kernels", "vae", "roofline", "guide", "control", "server", "sweep", "parity")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models and small sizes: checks everything in minutes")
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--knob-families", default=None, help="families for the knobs suite (default: z-image-turbo; "
                                                          "all with --quick)")
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--steps", type=int, help="steps per image in compare/knobs/roofline")
    ap.add_argument("--images", type=int, default=2, help="images per tool in compare (N)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--knobs", help="comma list of knob numbers or labels to run (default all)")
    ap.add_argument("--kernel-parts", default=",".join(kernel_suite.PARTS),
                    help="kernels: which parts (rows: our configurations, gemm: PyTorch's GEMM peak, "
                         "diffusers: the peer, profile: perf by kernel, load: the loader's time per "
                         "library)")
    ap.add_argument("--kernel-sizes", help="kernels: comma list of widths to run (256,512,1024; default all)")
    ap.add_argument("--kernel-configs", help=f"kernels: comma list of configurations ({','.join(kernel_suite.CONFIGS)})")
    ap.add_argument("--baseline-library", type=Path,
                    help="kernels (load part): a libstable-diffusion.so of another build (e.g. the previous "
                         "commit's) whose load is timed beside the installed one's")
    ap.add_argument("--vae-sizes", default="512,1024", help="vae: comma list of square sizes (default 512,1024)")
    ap.add_argument("--sweeps", default=",".join(guide.SWEEPS))
    ap.add_argument("--scale", type=float, help="guide: fraction of the articles' pixel counts (1.0 = ~1 MP)")
    ap.add_argument("--max-steps", type=int, help="guide: cap on steps")
    ap.add_argument("--base-steps", type=int, default=4, help="guide: steps of the non-step sweeps (capped)")
    ap.add_argument("--seeds", type=int, default=8, help="guide: seeds per orientation")
    ap.add_argument("--parity-dit", default="q4_k", help="parity: the DiT file's weight type (default q4_k, the "
                    "articles' files; q4_0, q8_0, bf16, ...)")
    ap.add_argument("--parity-parts", default=",".join(parity.PARTS),
                    help="parity: comma list of lora, cache, upscale, controlnet")
    ap.add_argument("--parity-control-sizes", default="512x512,1024x1024",
                    help="parity: the ControlNet rows' sizes (BF16: the first only)")
    ap.add_argument("--parity-control-dits", default=",".join(parity.CONTROL_DITS),
                    help="parity: the ControlNet rows' weights: q4_k (the files', repacked), bf16 (expanded)")
    ap.add_argument("--parity-lora-modes", default=",".join(parity.LORA_MODES),
                    help="parity: LoRA sets to run (runtime: on the file's weights; runtime-bf16: on the DiT "
                         "expanded to BF16; merged: lora_apply_mode immediately)")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<stamp>)")
    a = ap.parse_args(argv)
    if a.baseline_library is not None and not a.baseline_library.is_file():
        ap.error(f"--baseline-library {a.baseline_library}: no such file (a libstable-diffusion.so of another build)")
    quick = a.quick
    a.width = a.width or (64 if quick else 256)
    a.height = a.height or (64 if quick else 256)
    a.steps = a.steps or (2 if quick else 1)
    a.scale = a.scale or (64 * 64 / 2**20 if quick else 256 * 256 / 2**20)
    a.max_steps = a.max_steps or (3 if quick else 6)
    if quick:
        a.seeds = min(a.seeds, 2)
    a.knob_families = a.knob_families or (a.families if quick else "z-image-turbo")
    return a


def main(argv: list[str]) -> int:
    args = parse(argv)
    from sdcpp_py.synthetic import write_model_set
    from sdcpp_py.system import sd_cli_path

    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "-full")
    out = args.out or RESULTS / stamp
    work = CACHE / "work" / stamp
    size = "tiny" if args.quick else "full"
    suites = args.suites.split(",")
    sd_cli = sd_cli_path()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(),
                               "sd_cli": str(sd_cli), "upstream_sd_cli": str(compare.UPSTREAM_CLI)
                               if compare.UPSTREAM_CLI.exists() else None}
    md = [f"# sdcpp-py benchmarks ({size} synthetic models)", "",
          f"`python benchmarks/run.py {' '.join(argv)}`".replace(" `", "`"), "",
          f"Machine: {results['machine'].get('cpu_model')}, {results['machine'].get('cpus')} CPUs, "
          f"{results['machine'].get('mem_gb')} GB; CPU module: {_variant()}; threads {args.threads}; "
          f"sdcpp-py {results['machine'].get('sdcpp_py')}, engine {results['machine'].get('engine')}", ""]

    def models(family: str, dit_type: str = "q4_0"):
        return write_model_set(family, CACHE / "synthetic", size=size, dit_type=dit_type, llm_type="q4_0")

    families = args.families.split(",")
    if "compare" in suites:
        md.append("## Comparisons (ratios: the other's wall time / ours; > 1 means sdcpp-py is faster)")
        for fam in families:
            res = compare.run(fam, models(fam), args, work / "compare", sd_cli)
            results.setdefault("compare", []).append(res)
            md += compare.markdown(res, args)
            write_json(out / "results.json", results)
    if "knobs" in suites:
        md.append("## Settings (knobs)")
        for fam in args.knob_families.split(","):
            res = knobs.run(fam, lambda t, fam=fam: models(fam, t), args, work / "knobs")
            results.setdefault("knobs", []).append(res)
            md += knobs.markdown(res, args)
            write_json(out / "results.json", results)
    if "kernels" in suites:
        md.append("## Kernels and the weight policy")

        def kernel_models(family: str, dit_type: str, llm_type: str):
            return write_model_set(family, CACHE / "synthetic", size=size, dit_type=dit_type, llm_type=llm_type)
        res = kernel_suite.run(families, kernel_models, args, work / "kernels")
        results["kernels"] = res
        md += kernel_suite.markdown(res)
        write_json(out / "results.json", results)
    if "vae" in suites:
        def vae_models(family: str, which: str):
            return write_model_set(family, CACHE / "synthetic", size=which, dit_type="q4_0", llm_type="q4_0")
        results["vae"] = vae_suite.run(families, vae_models, args, work / "vae")
        md += vae_suite.markdown(results["vae"])
        write_json(out / "results.json", results)

        md += ["## Roofline", "", "| family | size | tokens (image + text) | GFLOP per step | s/step | "
               "achieved GFLOP/s | fp32 GEMM peak GFLOP/s | fraction |", "|---|---|---|---|---|---|---|---|"]
        for fam in families:
            step_s, tokens = _step_time(fam, models(fam), args, results, work / "roofline")
            r = {"family": fam, "width": args.width, "height": args.height,
                 **roofline(models(fam).diffusion_model, fam, args.width, args.height, tokens, step_s)}
            results.setdefault("roofline", []).append(r)
            md.append(f"| {fam} | {args.width}x{args.height} | {r['image_tokens']} + {r['text_tokens']} | "
                      f"{r['step_gflop']:.0f} | {r['step_s']:.2f} | {r['achieved_gflops']:.1f} | "
                      f"{r['peak_gflops_fp32_gemm']:.1f} | {r['fraction_of_peak']:.2f} |")
        md.append("")
    if "guide" in suites:
        md.append("## Field-guide sweeps")
        for fam in families:
            res = guide.run(fam, models(fam), args, work / "guide", out / "sheets")
            results.setdefault("guide", []).append(res)
            md += guide.markdown(res)
            write_json(out / "results.json", results)
    # suites run per family of --knob-families, each a module with run(family, models, args, work)
    # and markdown(result): (name, heading, module)
    per_family = (("control", "## Control: cancel, isolation, memory", control),
                  ("server", "## Server: HTTP on top of a generation, requests per minute", serving),
                  ("sweep", "## Sweeps: in one process and on Ray", sweeping))
    for name, heading, suite in per_family:
        if name not in suites:
            continue
        md.append(heading)
        for fam in args.knob_families.split(","):
            res = suite.run(fam, models(fam), args, work / name)
            results.setdefault(name, []).append(res)
            md += suite.markdown(res)
            write_json(out / "results.json", results)
    if "parity" in suites:
        md.append("## Engine parity: LoRAs, step caches, upscaling")
        parts = args.parity_parts.split(",")
        for fam in args.knob_families.split(",") if {"lora", "cache", "controlnet"} & set(parts) else ():
            res = parity.run(fam, models(fam, args.parity_dit), args, work / "parity", parts)
            results.setdefault("parity", []).append(res)
            md += parity.markdown(res) if res["rows"] else []
            md += parity.controlnet_markdown(res["controlnet"]) if res["controlnet"] else []
            write_json(out / "results.json", results)
        if "upscale" in parts:
            results["upscale"] = parity.upscale(args, work / "parity")
            md += parity.upscale_markdown(results["upscale"])
            write_json(out / "results.json", results)
    import plots

    results["plots"] = plots.make_all(results, out / "plots")
    md += ["## Files", "", f"- JSON: `{out / 'results.json'}`", f"- plots: `{out / 'plots'}`",
           f"- contact sheets: `{out / 'sheets'}`", f"- logs and images: `{work}`"]
    write_json(out / "results.json", results)
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _variant() -> str:
    import sdcpp_py

    return sdcpp_py.system_info()["cpu_variant"]


def _step_time(family: str, models, args, results: dict[str, Any], work: Path):
    """A DiT step time and text-token count: from this run's compare suite, or measured now."""
    for res in results.get("compare", []):
        if res["family"] == family:
            report = res["rows"][0]["reports"][0]
            return report["items"][0]["step_s"], report["text_tokens"]
    spec = {"files": {"diffusion_model": models.diffusion_model, "llm": models.llm, "vae": models.vae},
            "context": {"n_threads": args.threads}, "prompt": compare.PROMPT,
            "items": [{"width": args.width, "height": args.height, "steps": args.steps, "seed": 1}]}
    report = run_spec(spec, work, f"{family}-roofline").report
    return report["items"][0]["step_s"], report["text_tokens"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
