"""The field guide's experiments: steps, guidance, seeds in both orientations, aspect
ratios at ~1 MP, the 16:9 resolution ladder and quantizations. Each sweep loads one
model and encodes the prompt once (one process), saves every image, and gets a
labelled contact sheet and a timing table. Sizes scale with ``--scale`` (a fraction of
the pixel count, 1.0 = the sizes the articles use) and steps are capped by
``--max-steps``; what was actually run is recorded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from harness import run_spec
from PIL import Image, ImageDraw

PROMPT = "a cozy reading nook by a rainy window, warm lamp light, detailed illustration"
STEPS = (1, 3, 6, 9, 12, 15)
CFGS = (0.0, 0.25, 0.5, 0.75, 1.0)
ASPECTS = ((1, 1), (5, 4), (4, 5), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (21, 9), (9, 21))
LADDER_HEIGHTS = (432, 576, 720, 864, 1080)          # 16:9 rungs at full scale
QUANTS = ("f16", "q8_0", "q4_0", "q4_K", "q3_K", "q2_K")  # DiT weights as loaded (engine converts)
SWEEPS = ("steps", "cfg", "seeds", "aspects", "ladder", "quant")


def _m16(x: float) -> int:
    return max(16, int(round(x / 16)) * 16)


def size_for(aspect: tuple[int, int], pixels: float) -> tuple[int, int]:
    w, h = aspect
    k = math.sqrt(pixels / (w * h))
    return _m16(w * k), _m16(h * k)


def plan(sweep: str, args) -> list[tuple[str, dict[str, Any]]]:
    """(label, denoise keywords) per image of one sweep."""
    pixels = 1024 * 1024 * args.scale
    base = size_for((1, 1), pixels)
    one = {"width": base[0], "height": base[1], "steps": min(args.base_steps, args.max_steps), "seed": 1}
    if sweep == "steps":
        return [(f"{n} steps", {**one, "steps": n}) for n in STEPS if n <= args.max_steps]
    if sweep == "cfg":
        return [(f"cfg {c}", {**one, "cfg_scale": c}) for c in CFGS]
    if sweep == "seeds":
        land, port = size_for((4, 3), pixels), size_for((3, 4), pixels)
        return [(f"seed {s} {w}x{h}", {**one, "width": w, "height": h, "seed": s})
                for (w, h) in (land, port) for s in range(args.seeds)]
    if sweep == "aspects":
        return [(f"{a}:{b} {w}x{h}", {**one, "width": w, "height": h})
                for a, b in ASPECTS for w, h in [size_for((a, b), pixels)]]
    if sweep == "ladder":
        k = math.sqrt(args.scale)
        return [(f"{w}x{h}", {**one, "width": w, "height": h})
                for hh in LADDER_HEIGHTS for w, h in [(_m16(hh * 16 / 9 * k), _m16(hh * k))]]
    if sweep == "quant":
        return [(q, one) for q in QUANTS]
    raise ValueError(sweep)


def contact_sheet(cells: list[tuple[str, Path]], title: str, *, thumb: int = 192, cols: int = 6) -> Image.Image:
    """A grid of thumbnails (aspect kept) with a label under each."""
    cols = min(cols, max(1, len(cells)))
    rows = math.ceil(len(cells) / cols)
    pad, label_h, title_h = 8, 16, 22
    sheet = Image.new("RGB", (cols * (thumb + pad) + pad, title_h + rows * (thumb + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), title, fill="black")
    for i, (label, path) in enumerate(cells):
        im = Image.open(path).convert("RGB")
        k = thumb / max(im.width, im.height)   # up or down: tiny test images stay visible
        im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))),
                       Image.NEAREST if k > 1 else Image.LANCZOS)
        x = pad + (i % cols) * (thumb + pad)
        y = title_h + (i // cols) * (thumb + label_h + pad)
        sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        draw.text((x, y + thumb + 2), label[:34], fill="black")
    return sheet


def _images(spec_items, files, context, args, work: Path, tag: str, negative: str | None):
    spec = {"files": files, "context": {"n_threads": args.threads, **context}, "prompt": PROMPT,
            "negative_prompt": negative, "items": spec_items, "out": str(work / "images"), "tag": tag}
    return run_spec(spec, work, tag)


def run(family: str, models, args, work: Path, sheets: Path) -> dict[str, Any]:
    files = {"diffusion_model": models.diffusion_model, "llm": models.llm, "vae": models.vae}
    out: dict[str, Any] = {"family": family, "scale": args.scale, "max_steps": args.max_steps, "sweeps": {}}
    for sweep in args.sweeps.split(","):
        items = plan(sweep, args)
        rows, cells = [], []
        if sweep == "quant":
            reference = None   # the first type's image (F16: the stored weights, no re-quantization)
            for label, kw in items:
                context = {"tensor_type_rules": rf"^model\.diffusion_model\.={label}", "upcast": "none"}
                r = _images([kw], files, context, args, work, f"{family}-quant-{label}", None)
                it = r.report["items"][0]
                pixels = np.asarray(Image.open(it["image"]).convert("RGB"), dtype=np.int16)
                reference = pixels if reference is None else reference
                diff = np.abs(pixels - reference)
                rows.append({"label": label, **_timing(it), "load_s": round(r.report["load_s"], 2),
                             "peak_rss_mb": round(r.peak_rss_mb), "dit_bytes": r.report["weight_bytes"]["diffusion"],
                             "mean_abs_diff": round(float(diff.mean()), 2), "max_abs_diff": int(diff.max())})
                cells.append((f"{label} {it['step_s']:.1f}s/step", Path(it["image"])))
        else:
            negative = "" if sweep == "cfg" else None
            r = _images([kw for _, kw in items], files, {}, args, work, f"{family}-{sweep}", negative)
            for (label, _), it in zip(items, r.report["items"], strict=False):
                rows.append({"label": label, **_timing(it)})
                cells.append((f"{label} {it['denoise_s']:.1f}s", Path(it["image"])))
        sheet = sheets / f"{family}-{sweep}.png"
        sheet.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(cells, f"{family}: {sweep} (scale {args.scale}, max {args.max_steps} steps)").save(sheet)
        out["sweeps"][sweep] = {"rows": rows, "sheet": str(sheet)}
    return out


def _timing(it: dict[str, Any]) -> dict[str, Any]:
    return {"width": it["width"], "height": it["height"], "steps": it["steps"], "seed": it["seed"],
            "cfg_scale": it.get("cfg_scale", 1.0), "denoise_s": round(it["denoise_s"], 3),
            "step_s": round(it["step_s"], 3), "decode_s": round(it["decode_s"], 3)}


def markdown(res: dict[str, Any]) -> list[str]:
    md = [f"### {res['family']} (scale {res['scale']}, steps capped at {res['max_steps']})", ""]
    for sweep, data in res["sweeps"].items():
        if sweep == "quant":
            md += _quant_markdown(data)
            continue
        md += [f"**{sweep}** — contact sheet `{Path(data['sheet']).name}`", "",
               "| image | size | steps | cfg | denoise s | s/step | decode s |", "|---|---|---|---|---|---|---|"]
        md += [f"| {r['label']} | {r['width']}x{r['height']} | {r['steps']} | {r['cfg_scale']} | {r['denoise_s']} | "
               f"{r['step_s']} | {r['decode_s']} |" for r in data["rows"]]
        md.append("")
    return md


def _quant_markdown(data: dict[str, Any]) -> list[str]:
    first = data["rows"][0]["label"]
    md = [f"**quant** — contact sheet `{Path(data['sheet']).name}`; image difference against {first} "
          "(levels of 255, mean / max)", "",
          "| DiT weights | size | load s | s/step | decode s | DiT GiB | peak RSS MB | diff vs " + first + " |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['label']} | {r['width']}x{r['height']} | {r['load_s']} | {r['step_s']} | {r['decode_s']} | "
           f"{r['dit_bytes'] / 2**30:.2f} | {r['peak_rss_mb']} | {r['mean_abs_diff']} / {r['max_abs_diff']} |"
           for r in data["rows"]]
    return md + [""]
