"""The measured process: load one Pipeline, encode one prompt once, then denoise and
decode a list of items with it. Reads a JSON spec, prints one BENCH_JSON line.

    python benchmarks/child.py spec.json

spec: {"files": {"diffusion_model": ..., "llm": ..., "vae": ...},
       "context": {ContextSettings keywords}, "prompt": str, "negative_prompt": str|null,
       "items": [{"width", "height", "steps", "seed", ... GenerationSettings fields,
                  "control": true (a ControlNet in files: a random control image's latent, made once
                  per size and timed apart)}], "out": dir|null, "tag": str}
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import emit  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    # the engine's own stage timings go to stdout, where the harness reads them
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
    logging.getLogger("sdcpp_py.native").setLevel(logging.INFO)
    import sdcpp_py
    from sdcpp_py import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline(**spec["files"], **spec.get("context", {}))
    load_s = time.perf_counter() - t0
    controlnet_load_s = None
    if pipe.controlnet is not None:   # loaded on first use: here, timed apart from the steps
        t3 = time.perf_counter()
        pipe.controlnet.ensure()
        controlnet_load_s = time.perf_counter() - t3
    cond = pipe.encode(spec["prompt"], spec.get("negative_prompt"))
    out = Path(spec["out"]) if spec.get("out") else None
    items = []
    controls: dict[tuple[int, int], tuple[object, float]] = {}
    for n, item in enumerate(spec["items"]):
        item = dict(item)
        extra: dict[str, object] = {}
        if item.pop("control", False):
            size = (item["width"], item["height"])
            if size not in controls:
                import numpy as np
                from PIL import Image
                pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                t2 = time.perf_counter()
                controls[size] = (pipe.encode_control(Image.fromarray(pixels), width=size[0], height=size[1]),
                                  time.perf_counter() - t2)
            extra = {"control": controls[size][0]}
        per_step = []   # the engine's own time of each sampling step
        latent = pipe.denoise(cond, progress=lambda i, n, sec, per_step=per_step: i > 0 and per_step.append(round(sec, 4)),
                              **item, **extra)
        t1 = time.perf_counter()
        image = pipe.decode(latent) if spec.get("decode", True) else None
        decode_s = time.perf_counter() - t1 if image is not None else None
        row = {**item, "seed": latent.seed, "denoise_s": latent.info["denoise_s"], "decode_s": decode_s,
               "step_s": latent.info["denoise_s"] / item.get("steps", 1), "steps_s": per_step,
               "cache": latent.info["cache"]}
        if extra:
            row["control"], row["control_encode_s"] = True, controls[(item["width"], item["height"])][1]
            row["controlnet"] = pipe.controlnet_loaded
        if out is not None and image is not None:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{spec.get('tag', 'img')}-{n:02d}.png"
            image.save(path)
            row["image"], row["png_bytes"] = str(path), path.stat().st_size
        items.append(row)
    info = sdcpp_py.system_info()
    emit({"load_s": load_s, "controlnet_load_s": controlnet_load_s, "encode_s": cond.seconds, "text_tokens": int(cond.context.shape[0]),
          "items": items, "wall_s": time.perf_counter() - t0, "device": pipe.device,
          "cpu_variant": info["cpu_variant"], "threads": pipe.settings.n_threads,
          "upcast": list(pipe.weight_plan.components), "upcast_reason": pipe.weight_plan.reason,
          "weights": pipe.weights,
          "weight_bytes": pipe.weight_bytes, "family": pipe.family})
    pipe.close()


if __name__ == "__main__":
    main(sys.argv[1])
