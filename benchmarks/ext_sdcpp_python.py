"""Runs inside benchmarks/cache/venv-sdcpp-python: stable-diffusion-cpp-python 0.4.7
generating the comparison's images in one process (its model stays loaded; each
generate_image call encodes the prompt again). Prints one BENCH_JSON line."""

import json
import sys
import time
from pathlib import Path

from stable_diffusion_cpp import StableDiffusion


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    files = spec["files"]
    t0 = time.perf_counter()
    sd = StableDiffusion(diffusion_model_path=files["diffusion_model"], llm_path=files["llm"],
                         vae_path=files["vae"], n_threads=spec["threads"], verbose=False)
    load_s = time.perf_counter() - t0
    items = []
    for seed in spec["seeds"]:
        t1 = time.perf_counter()
        images = sd.generate_image(prompt=spec["prompt"], width=spec["width"], height=spec["height"],
                                   sample_steps=spec["steps"], cfg_scale=1.0, seed=seed)
        items.append({"seed": seed, "wall_s": time.perf_counter() - t1})
        images[0].save(Path(spec["out"]) / f"sdcpp-python-{seed}.png")
    print("BENCH_JSON " + json.dumps({"load_s": load_s, "items": items, "wall_s": time.perf_counter() - t0}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
