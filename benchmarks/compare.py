"""Comparisons users make, side by side in one run on the same synthetic files:

a. N images in one sdcpp-py process (one load, one encoding) against N sd-cli
   processes, sd-cli built from the same source with the package's flags and with
   upstream's default flags (benchmarks/build_upstream_cli.sh);
b. one image in-process against sd-cli's own stage timings (our overhead);
c. stable-diffusion-cpp-python 0.4.7 (benchmarks/setup_external.sh sdcpp-python);
d. diffusers (PyTorch, CPU), FLUX.2 Klein transformer steps (setup_external.sh diffusers).

Tools that are not set up are reported as skipped, not guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import CACHE, HERE, Run, ratio, run_child, run_spec

PROMPT = "a lighthouse on a rocky coast at dawn, oil painting, dramatic clouds"
UPSTREAM_CLI = CACHE / "upstream" / "bin" / "sd-cli"
VENV_SDCPP_PYTHON = CACHE / "venv-sdcpp-python" / "bin" / "python"
VENV_DIFFUSERS = CACHE / "venv-diffusers" / "bin" / "python"


def run_diffusers(spec: dict[str, Any], work: Path, tag: str) -> Run | str:
    """benchmarks/ext_diffusers.py on ``spec`` in the diffusers venv: the run, or why it failed."""
    path = work / f"{tag}.json"
    path.write_text(json.dumps(spec))
    try:
        return run_child([str(VENV_DIFFUSERS), str(HERE / "ext_diffusers.py"), str(path)], log=work / f"{tag}.log")
    except RuntimeError as e:
        return "failed: " + " ".join(str(e).split())[-300:]


def _stages(run: Run) -> dict[str, float]:
    return {k: round(v, 2) for k, v in run.stages.items()}


def _cli(cli: Path, models, seed: int, args, work: Path, tag: str) -> Run:
    return run_child([str(cli), "--diffusion-model", str(models.diffusion_model), "--llm", str(models.llm),
                      "--vae", str(models.vae), "-p", PROMPT, "-W", str(args.width), "-H", str(args.height),
                      "--steps", str(args.steps), "--cfg-scale", "1", "-s", str(seed), "-t", str(args.threads),
                      "-o", str(work / f"{tag}-{seed}.png")], log=work / f"{tag}-{seed}.log")


def _ours(models, args, work: Path, tag: str, **context: Any) -> Run:
    spec = {"files": {"diffusion_model": models.diffusion_model, "llm": models.llm, "vae": models.vae},
            "context": {"n_threads": args.threads, **context}, "prompt": PROMPT, "tag": tag, "out": str(work),
            "items": [{"width": args.width, "height": args.height, "steps": args.steps, "seed": s}
                      for s in range(args.images)]}
    return run_spec(spec, work, tag)


def _row(name: str, runs: list[Run], images: int, note: str = "") -> dict[str, Any]:
    wall = sum(r.wall_s for r in runs)
    return {"name": name, "processes": len(runs), "images": images, "wall_s": round(wall, 2),
            "per_image_s": round(wall / images, 2), "peak_rss_mb": round(max(r.peak_rss_mb for r in runs)),
            "stages": [_stages(r) for r in runs], "reports": [r.report for r in runs], "note": note}


def _external(python: Path, script: str, payload: dict[str, Any], work: Path, tag: str,
              skipped: dict[str, str], name: str, setup: str) -> Run | None:
    """Run another tool's script in its own venv; a missing venv or a failed run is recorded."""
    if not python.exists():
        skipped[name] = f"not set up: run benchmarks/setup_external.sh {setup}"
        return None
    spec = work / f"{tag}.json"
    spec.write_text(json.dumps(payload, default=str))
    try:
        return run_child([str(python), str(HERE / script), str(spec)], log=work / f"{tag}.log")
    except RuntimeError as e:
        last = [line for line in str(e).splitlines() if line.strip()][-1:]
        skipped[name] = f"failed ({last[0] if last else e}); log: {work / (tag + '.log')}"
        return None


def run(family: str, models, args, work: Path, sd_cli: Path | None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    n = args.images
    ours = _ours(models, args, work, f"{family}-ours")
    rows.append(_row("sdcpp-py, defaults (1 process)", [ours], n,
                     f"upcast to F16: {', '.join(ours.report['upcast']) or 'none'}"))
    same = _ours(models, args, work, f"{family}-ours-cli-settings", upcast="none", flash_attn=False)
    rows.append(_row("sdcpp-py, sd-cli's settings (1 process)", [same], n,
                     "files' weight types, no flash attention"))
    cli_runs: list[Run] = []
    if sd_cli is not None:
        cli_runs = [_cli(sd_cli, models, s, args, work, f"{family}-cli") for s in range(n)]
        rows.append(_row("sd-cli, package flags (N processes)", cli_runs, n))
    else:
        skipped["sd-cli"] = "not built: install with SDCPP_PY_BUILD_CLI=ON"
    up_runs: list[Run] = []
    if UPSTREAM_CLI.exists():
        up_runs = [_cli(UPSTREAM_CLI, models, s, args, work, f"{family}-upstream") for s in range(n)]
        rows.append(_row("sd-cli, upstream default flags (N processes)", up_runs, n))
    else:
        skipped["sd-cli upstream flags"] = "not built: run benchmarks/build_upstream_cli.sh"
    payload = {"files": {k: str(getattr(models, k)) for k in ("diffusion_model", "llm", "vae")}, "prompt": PROMPT,
               "width": args.width, "height": args.height, "steps": args.steps, "seeds": list(range(n)),
               "threads": args.threads, "out": str(work)}
    sdpy = _external(VENV_SDCPP_PYTHON, "ext_sdcpp_python.py", payload, work, f"{family}-sdcpp-python",
                     skipped, "stable-diffusion-cpp-python", "sdcpp-python")
    if sdpy is not None:
        rows.append(_row("stable-diffusion-cpp-python 0.4.7 (1 process)", [sdpy], n))
    diff = None
    if family == "flux2-klein" and not args.quick:   # diffusers needs the real Klein 4B shapes
        diff = _external(VENV_DIFFUSERS, "ext_diffusers.py", {**payload, "text_tokens": ours.report["text_tokens"],
                                                                    "family": family, "weights": "gguf"},
                         work, f"{family}-diffusers", skipped, "diffusers", "diffusers")

    inside = same.report
    engine = sum(v for k, v in same.stages.items() if k != "load_s")
    one_cli = cli_runs[0].stages if cli_runs else {}
    ours_first = inside["items"][0]
    ratios = {
        "a_sd_cli_package_flags_vs_ours_same_settings": ratio(sum(r.wall_s for r in cli_runs), same.wall_s) if cli_runs else None,
        "a_sd_cli_upstream_flags_vs_ours_defaults": ratio(sum(r.wall_s for r in up_runs), ours.wall_s) if up_runs else None,
        "a_sd_cli_package_flags_vs_ours_defaults": ratio(sum(r.wall_s for r in cli_runs), ours.wall_s) if cli_runs else None,
        "b_overhead_in_process": ratio(inside["encode_s"] + sum(i["denoise_s"] + i["decode_s"] for i in inside["items"]),
                                       engine) if engine else None,
        "b_first_image_vs_sd_cli_stages": ratio(inside["encode_s"] + ours_first["denoise_s"] + ours_first["decode_s"],
                                                sum(v for k, v in one_cli.items() if k != "load_s")) if one_cli else None,
        "c_sdcpp_python_vs_ours_defaults": ratio(sdpy.wall_s, ours.wall_s) if sdpy else None,
    }
    out: dict[str, Any] = {"family": family, "rows": rows, "ratios": ratios, "skipped": skipped,
                           "text_tokens": ours.report["text_tokens"]}
    if diff is not None:
        d = diff.report
        our_step = ours.report["items"][0]["step_s"]
        out["diffusers"] = {**d, "peak_rss_mb": round(diff.peak_rss_mb), "ours_step_s": our_step,
                            "ours_peak_rss_mb": round(ours.peak_rss_mb)}
        out["ratios"]["d_diffusers_step_vs_ours_step"] = ratio(d["step_s"], our_step)
        out["ratios"]["d_diffusers_rss_vs_ours_rss"] = ratio(diff.peak_rss_mb, ours.peak_rss_mb)
    return out


def markdown(res: dict[str, Any], args) -> list[str]:
    md = [f"### {res['family']}: {args.width}x{args.height}, {args.steps} step(s), {args.images} images, "
          f"{args.threads} threads", "",
          "| run | processes | wall s | per image s | peak RSS MB | note |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        md.append(f"| {r['name']} | {r['processes']} | {r['wall_s']:.1f} | {r['per_image_s']:.1f} | "
                  f"{r['peak_rss_mb']} | {r['note']} |")
    md += ["", "| ratio | value |", "|---|---|"]
    md += [f"| {k} | {'' if v is None else v} |" for k, v in res["ratios"].items()]
    if "diffusers" in res:
        d = res["diffusers"]
        md += ["", f"diffusers ({d.get('dtype')}, transformer only, {d.get('tokens')} tokens): "
                   f"{d['step_s']:.1f} s/step, peak RSS {d['peak_rss_mb']} MB; "
                   f"sdcpp-py: {d['ours_step_s']:.1f} s/step, {d['ours_peak_rss_mb']} MB"]
    for k, v in res["skipped"].items():
        md.append(f"- skipped {k}: {v}")
    return md + [""]
