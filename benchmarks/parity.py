"""What the engine-parity features cost: LoRAs (none, one, three; applied at runtime or
merged into the weights), step caches (each mode against the plain schedule at the
family's step count), ESRGAN upscaling (load, one x4 pass, peak memory) and the Z-Image
ControlNet Union (2.1 layout: load, one step and peak memory without and with it, on the
file's Q4_K weights and on BF16, beside diffusers' ControlNet step).

LoRA and cache rows are items of one process each, on one prompt encoding: the first
item of a LoRA set includes applying it, the repeat shows the steady state. The
upscaler runs in its own child (``parity.py --child SPEC``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import VENV_DIFFUSERS, _external  # noqa: E402
from harness import CACHE, emit, ratio, run_script, run_spec  # noqa: E402

PROMPT = "a red fox in the snow, morning light"
CACHE_STEPS = {"z-image-turbo": 8, "flux2-klein": 4}
CACHE_MODES = ("easycache", "dbcache", "taylorseer", "cache-dit", "spectrum")
LORA_RANK = 32
PARTS = ("lora", "cache", "upscale", "controlnet")
# the ControlNet rows: DiT and ControlNet weights, (context keywords, ControlNet file type and format)
CONTROL_DITS = {"q4_k": ({}, "q4_k", "gguf"),
                "bf16": ({"upcast": "diffusion", "upcast_type": "bf16", "release_encoder": True}, "bf16", "safetensors")}
# how the LoRA sets run: at run time on the file's weights (Q4_K: repacked), at run time on the
# DiT expanded to BF16, and merged into the weights (repack off: the policy expands Q4_K to BF16)
LORA_MODES = {"runtime": ("at_runtime", {}),
              "runtime-bf16": ("at_runtime", {"upcast": "diffusion", "upcast_type": "bf16"}),
              "merged": ("immediately", {"lora_apply_mode": "immediately", "repack": "none"})}


def loras(family: str, size: str, n: int) -> list[list[Any]]:
    """``n`` synthetic LoRAs for the family's DiT (written once into the cache), multiplier 0.8."""
    from sdcpp_py.synthetic import write_lora

    out = []
    for i in range(n):
        path = CACHE / "synthetic" / f"lora-{family}-{size}-r{LORA_RANK}-{i}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_lora(path.with_suffix(".part"), family, size, rank=LORA_RANK, seed=i)
            path.with_suffix(".part").rename(path)
        out.append([str(path), 0.8])
    return out


def run(family: str, models: Any, args: Any, work: Path, parts: Any = PARTS) -> dict[str, Any]:
    size = "tiny" if args.quick else "full"
    files = {"diffusion_model": models.diffusion_model, "llm": models.llm, "vae": models.vae}
    base = {"width": args.width, "height": args.height, "steps": args.steps, "seed": 7}
    rows: list[dict[str, Any]] = []
    if "lora" in parts:
        rows += lora_rows(family, size, files, base, args, work)
    if "cache" in parts:
        rows += cache_rows(family, files, base, args, work)
    control: list[dict[str, Any]] = []
    if "controlnet" in parts and family == "z-image-turbo":
        control = controlnet_rows(size, files, args, work)
    for row in rows:      # each against the no-LoRA (no-cache) item of its own process
        ref = next(x for x in rows if (x["part"], x.get("apply"), x["label"]) == (row["part"], row.get("apply"), "none"))
        row["denoise_vs_none"] = ratio(row["denoise_s"], ref["denoise_s"])
    return {"family": family, "width": args.width, "height": args.height, "steps": args.steps,
            "dit": Path(models.diffusion_model).name, "rows": rows, "controlnet": control}


def controlnet_file(size: str, wtype: str, fmt: str) -> Path:
    """The synthetic ControlNet Union 2.1 file (written once into the cache)."""
    from sdcpp_py.synthetic import write_controlnet

    return write_controlnet(CACHE / "synthetic", "2.1", size=size, wtype=wtype, fmt=fmt)


def controlnet_rows(size: str, files: dict[str, Any], args: Any, work: Path) -> list[dict[str, Any]]:
    """One step per size without and with the ControlNet (one process each: the peaks are apart),
    per weight kind; diffusers' BF16 step without and with its ControlNet at the first size."""
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.parity_control_sizes.split(",")]
    if args.quick:
        sizes = [(args.width, args.height)]
    rows: list[dict[str, Any]] = []
    for dit in args.parity_control_dits.split(","):
        context, wtype, fmt = CONTROL_DITS[dit]
        net = controlnet_file(size, wtype, fmt)
        use = sizes if dit == "q4_k" else sizes[:1]     # BF16 weights of both at 1 MP: over 24 GB
        for with_control in (False, True):
            items = [{"width": w, "height": h, "steps": 1, "seed": 7, **({"control": True} if with_control else {})}
                     for w, h in use]
            spec = {"files": {**files, **({"controlnet": str(net)} if with_control else {})}, "prompt": PROMPT,
                    "context": {"n_threads": args.threads, **context}, "items": items, "decode": False,
                    "tag": f"controlnet-{dit}-{with_control}"}
            r = run_spec(spec, work, f"controlnet-{dit}-{'on' if with_control else 'off'}")
            for item in r.report["items"]:
                rows.append({"who": "sdcpp-py", "weights": dit, "size": f"{item['width']}x{item['height']}",
                             "controlnet": with_control, "load_s": round(r.report["load_s"], 2),
                             "controlnet_load_s": round(r.report.get("controlnet_load_s") or 0, 2),
                             "step_s": round(item["step_s"], 4), "control_encode_s": round(item.get("control_encode_s") or 0, 2),
                             "controlnet_mb": round(int((item.get("controlnet") or {}).get("bytes", 0)) / 2**20),
                             "peak_rss_mb": round(r.peak_rss_mb)})
    if not args.quick:
        w, h = sizes[0]
        for variant in (None, "2.1"):
            skipped: dict[str, str] = {}
            d = _external(VENV_DIFFUSERS, "ext_diffusers.py",
                          {"family": "z-image-turbo", "width": w, "height": h, "steps": 1, "threads": args.threads,
                           "text_tokens": 32, "dtype": "bfloat16", "controlnet": variant},
                          work, f"diffusers-controlnet-{variant}", skipped, "diffusers", "diffusers")
            if d is not None:
                rows.append({"who": f"diffusers {d.report.get('torch', '')}", "weights": "bf16", "size": f"{w}x{h}",
                             "controlnet": variant is not None, "load_s": round(d.report["load_s"], 2),
                             "step_s": round(d.report["step_s"], 4), "control_encode_s": "",
                             "controlnet_mb": "", "peak_rss_mb": round(d.peak_rss_mb)})
            else:
                rows.append({"who": "diffusers", "skipped": "; ".join(skipped.values())})
    for row in rows:          # each against the same weights and size without the ControlNet
        ref = next((x for x in rows if x.get("who") == row.get("who") and x.get("weights") == row.get("weights")
                    and x.get("size") == row.get("size") and not x.get("controlnet")), None)
        if ref is not None and "step_s" in row:
            row["step_vs_plain"] = ratio(row["step_s"], ref["step_s"])
            row["rss_vs_plain"] = ratio(row["peak_rss_mb"], ref["peak_rss_mb"])
    return rows


def controlnet_markdown(rows: list[dict[str, Any]]) -> list[str]:
    md = ["### Z-Image ControlNet Union 2.1 (15 control blocks + 2 refiner blocks), one step, one process per "
          "row set", "",
          "| who | weights | size | ControlNet | load s (+ ControlNet) | step s | x without | control latent s | "
          "ControlNet MB | peak RSS MB | x without |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            md.append(f"| {r['who']} | skipped: {r['skipped']} |||||||||| ")
            continue
        md.append(f"| {r['who']} | {r['weights']} | {r['size']} | {'yes' if r['controlnet'] else 'no'} | "
                  f"{r['load_s']}{' + ' + str(r['controlnet_load_s']) if r.get('controlnet_load_s') else ''} | "
                  f"{r['step_s']} | {r.get('step_vs_plain', '')} | {r['control_encode_s']} | "
                  f"{r['controlnet_mb']} | {r['peak_rss_mb']} | {r.get('rss_vs_plain', '')} |")
    return md + [""]


def lora_rows(family: str, size: str, files: dict[str, Any], base: dict[str, Any], args: Any,
              work: Path) -> list[dict[str, Any]]:
    one, three = loras(family, size, 1), loras(family, size, 3)
    lora_items = [("none", {}), ("1 LoRA", {"loras": one}), ("1 LoRA again", {"loras": one}),
                  ("3 LoRAs", {"loras": three}), ("3 LoRAs again", {"loras": three}), ("none again", {})]
    rows: list[dict[str, Any]] = []
    for name in getattr(args, "parity_lora_modes", ",".join(LORA_MODES)).split(","):
        mode, context = LORA_MODES[name]
        spec = {"files": files, "context": {"n_threads": args.threads, "lora_apply_mode": mode, **context},
                "prompt": PROMPT, "items": [{**base, **extra} for _, extra in lora_items], "tag": f"lora-{name}",
                "decode": False}
        r = run_spec(spec, work, f"{family}-lora-{name}")
        for (label, _), item in zip(lora_items, r.report["items"], strict=True):
            rows.append({"part": "lora", "apply": name, "label": label, "load_s": round(r.report["load_s"], 2),
                         "denoise_s": round(item["denoise_s"], 3), "step_s": round(item["step_s"], 3),
                         "peak_rss_mb": round(r.peak_rss_mb), "expanded": r.report["upcast"]})
    return rows


def cache_rows(family: str, files: dict[str, Any], base: dict[str, Any], args: Any, work: Path) -> list[dict[str, Any]]:
    steps = CACHE_STEPS.get(family, 4)
    cache_items = [("none", {})] + [(m, {"cache_mode": m}) for m in CACHE_MODES]
    spec = {"files": files, "context": {"n_threads": args.threads}, "prompt": PROMPT, "tag": "cache", "decode": False,
            "items": [{**base, "steps": steps, **extra} for _, extra in cache_items]}
    r = run_spec(spec, work, f"{family}-cache")
    return [{"part": "cache", "label": label, "steps": steps, "denoise_s": round(item["denoise_s"], 3),
             "skipped": item["cache"].get("skipped", 0), "peak_rss_mb": round(r.peak_rss_mb)}
            for (label, _), item in zip(cache_items, r.report["items"], strict=True)]


def upscale(args: Any, work: Path) -> dict[str, Any]:
    """One RealESRGAN x4plus pass (23 blocks; 1 with --quick) over a synthetic image."""
    from sdcpp_py.synthetic import write_esrgan

    size = "tiny" if args.quick else "full"
    path = CACHE / "synthetic" / f"esrgan-x4-{size}.safetensors"
    if not path.exists():
        write_esrgan(path.with_suffix(".part"), size)
        path.with_suffix(".part").rename(path)
    side = 64 if args.quick else 512
    r = run_script("parity.py", {"model": str(path), "side": side, "threads": args.threads}, work, f"upscale-{size}")
    return {**r.report, "wall_s": round(r.wall_s, 2), "peak_rss_mb": round(r.peak_rss_mb)}


def child(spec_path: str) -> None:
    import numpy as np
    from PIL import Image

    from sdcpp_py import Upscaler

    spec = json.loads(Path(spec_path).read_text())
    side = spec["side"]
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    up = Upscaler(spec["model"], n_threads=spec["threads"])
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = up.upscale(Image.fromarray(pixels))
    emit({"load_s": round(load_s, 2), "upscale_s": round(time.perf_counter() - t1, 2),
          "input": f"{side}x{side}", "output": f"{out.width}x{out.height}", "scale": up.scale})
    up.close()


def markdown(res: dict[str, Any]) -> list[str]:
    md = [f"### {res['family']}: {res['width']}x{res['height']}, DiT {res['dit']}, one process per apply mode / "
          "cache set", "",
          "| part | apply | item | steps | load s | denoise s | x no-LoRA / no-cache | skipped steps | peak RSS MB |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        md.append(f"| {r['part']} | {r.get('apply', '')} | {r['label']} | {r.get('steps', res['steps'])} | "
                  f"{r.get('load_s', '')} | {r['denoise_s']} | {r.get('denoise_vs_none', '')} | "
                  f"{r.get('skipped', '')} | {r['peak_rss_mb']} |")
    return md + [""]


def upscale_markdown(u: dict[str, Any]) -> list[str]:
    return [f"Upscale (RealESRGAN x4plus layout) {u['input']} -> {u['output']}: load {u['load_s']} s, "
            f"one pass {u['upscale_s']} s, peak RSS {u['peak_rss_mb']} MB", ""]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        sys.exit("run through benchmarks/run.py --suites parity")
