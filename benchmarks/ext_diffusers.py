"""Runs inside benchmarks/cache/venv-diffusers: diffusers' FLUX.2 transformer with the
Klein 4B configuration and the synthetic DiT's weights (the GGUF file dequantized to
fp32, converted with diffusers' own BFL-to-diffusers mapping), timed per step on the
same token counts as sdcpp-py. The text encoder and VAE are left out: this is the
per-step and memory comparison. Prints one BENCH_JSON line."""

import json
import os
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

KLEIN_4B = dict(num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=7680, in_channels=128, mlp_ratio=3.0, guidance_embeds=False)


def load_gguf(path: str, dtype: torch.dtype) -> dict:
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.array(arr.reshape(tuple(int(d) for d in reversed(t.shape))), dtype=np.float32)
        state[t.name] = torch.from_numpy(arr).to(dtype)
    return state


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, os.environ.get("SDCPP_PY_BENCH_TORCH_DTYPE", "float32"))
    t0 = time.perf_counter()
    state = convert_flux2_transformer_checkpoint_to_diffusers(load_gguf(spec["files"]["diffusion_model"], dtype))
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**KLEIN_4B)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise SystemExit(f"weights do not match the Klein 4B layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del state
    model.eval()
    load_s = time.perf_counter() - t0
    img = (spec["width"] // 16) * (spec["height"] // 16)
    txt = spec["text_tokens"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, img, 128, generator=g, dtype=dtype)
    context = torch.randn(1, txt, 7680, generator=g, dtype=dtype)
    side = spec["width"] // 16
    img_ids = torch.zeros(img, 4)
    img_ids[:, 1] = torch.arange(img) // side
    img_ids[:, 2] = torch.arange(img) % side
    txt_ids = torch.zeros(txt, 4)
    txt_ids[:, 3] = torch.arange(txt)
    steps = []
    with torch.inference_mode():
        for i in range(max(2, spec["steps"] + 1)):   # the first call warms up
            t1 = time.perf_counter()
            model(hidden_states=hidden, encoder_hidden_states=context, timestep=torch.tensor([1.0 - 0.1 * i]),
                  img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
            steps.append(time.perf_counter() - t1)
    print("BENCH_JSON " + json.dumps({"load_s": load_s, "steps_s": steps, "step_s": min(steps[1:]),
                                      "dtype": str(dtype).replace("torch.", ""), "tokens": img + txt,
                                      "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
