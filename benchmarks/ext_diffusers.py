"""Runs inside benchmarks/cache/venv-diffusers (PyTorch CPU + diffusers); prints one
BENCH_JSON line. Two jobs, chosen by the spec's "job":

- "transformer" (default): diffusers' DiT of a family with its real configuration, timed
  per step on the same token counts as sdcpp-py. Weights are random (``"weights":
  "random"``: speed does not depend on their values) or the synthetic GGUF dequantized and
  mapped with diffusers' own BFL converter (``"gguf"``, FLUX.2 Klein only). The text
  encoder and VAE are left out: a per-step and memory comparison.
- "vae": diffusers' VAE decode of a random latent (AutoencoderKL with the FLUX.1 VAE's
  configuration, AutoencoderKLFlux2 with FLUX.2's), random weights, timed per decode.
- "gemm": PyTorch's own GEMM (``torch.nn.functional.linear``, oneDNN / MKL) on a list of
  (rows, in, out, count) shapes, in BF16 and FP32: the practical peak of these cores on a
  step's matmuls, weighted by how often each shape occurs.
"""

import json
import os
import sys
import time
from pathlib import Path

# Run as a script, this folder is first on sys.path, and its modules (kernel_suite, compare,
# ...) would shadow packages that transformers and diffusers import: drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

KLEIN_4B = dict(num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=7680, in_channels=128, mlp_ratio=3.0, guidance_embeds=False)


def load_gguf(path: str, dtype: torch.dtype) -> dict:
    import gguf

    state = {}
    for t in gguf.GGUFReader(path).tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.array(arr.reshape(tuple(int(d) for d in reversed(t.shape))), dtype=np.float32)
        state[t.name] = torch.from_numpy(arr).to(dtype)
    return state


def _random_model(cls, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The model built on the meta device, then given storage filled with N(0, 0.02)."""
    with torch.device("meta"):
        model = cls(**config).to(dtype)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    for name, buf in model.named_buffers():
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            raise SystemExit(f"{cls.__name__} has buffer {name}: random storage would leave it uninitialised")
        with torch.no_grad():   # batch-norm statistics (the FLUX.2 VAE's latent norm): the identity
            buf.fill_(1 if name.endswith("running_var") else 0)
    return model


def klein(spec: dict, dtype: torch.dtype):
    from diffusers import Flux2Transformer2DModel

    if spec.get("weights", "random") == "gguf":
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

        state = convert_flux2_transformer_checkpoint_to_diffusers(load_gguf(spec["files"]["diffusion_model"], dtype))
        with torch.device("meta"):
            model = Flux2Transformer2DModel(**KLEIN_4B)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise SystemExit(f"weights do not match the Klein 4B layout: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        del state
    else:
        model = _random_model(Flux2Transformer2DModel, KLEIN_4B, dtype)
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

    def step(i: int) -> None:
        model(hidden_states=hidden, encoder_hidden_states=context, timestep=torch.tensor([1.0 - 0.1 * i]),
              img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
    return model, step, img + txt


def z_image(spec: dict, dtype: torch.dtype):
    from diffusers import ZImageTransformer2DModel

    model = _random_model(ZImageTransformer2DModel, {}, dtype)   # the defaults are Z-Image-Turbo's 6B config
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(16, 1, spec["height"] // 8, spec["width"] // 8, generator=g, dtype=dtype)
    caption = torch.randn(spec["text_tokens"], 2560, generator=g, dtype=dtype)
    img = (spec["width"] // 16) * (spec["height"] // 16)

    controlnet = None
    if spec.get("controlnet"):        # a ControlNet Union of the published layout ("1.0" | "2.1"), random
        from diffusers import ZImageControlNetModel
        v1 = spec["controlnet"] == "1.0"
        config = {"control_layers_places": list(range(0, 30, 5 if v1 else 2)),
                  "control_refiner_layers_places": [0, 1], "control_in_dim": 16 if v1 else 33,
                  "add_control_noise_refiner": None if v1 else "control_noise_refiner"}
        controlnet = ZImageControlNetModel.from_transformer(_random_model(ZImageControlNetModel, config, dtype), model)
        control = torch.randn(config["control_in_dim"], 1, spec["height"] // 8, spec["width"] // 8, generator=g,
                              dtype=dtype)

    def step(i: int) -> None:
        t = torch.tensor([1.0 - 0.1 * i], dtype=dtype)
        samples = None if controlnet is None else controlnet([latent], t, [caption], [control], conditioning_scale=0.75)
        model([latent], t, [caption], controlnet_block_samples=samples, return_dict=False)
    return (model if controlnet is None else torch.nn.ModuleList([model, controlnet])), step, img + spec["text_tokens"]


def transformer(spec: dict) -> dict:
    dtype = getattr(torch, spec.get("dtype") or os.environ.get("SDCPP_PY_BENCH_TORCH_DTYPE", "float32"))
    t0 = time.perf_counter()
    model, step, tokens = {"flux2-klein": klein, "z-image-turbo": z_image}[spec.get("family", "flux2-klein")](spec, dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    steps = []
    with torch.inference_mode():
        for i in range(max(2, spec["steps"] + 1)):   # the first call warms up
            t1 = time.perf_counter()
            step(i)
            steps.append(time.perf_counter() - t1)
    return {"load_s": load_s, "steps_s": steps, "step_s": min(steps[1:]), "dtype": str(dtype).replace("torch.", ""),
            "tokens": tokens, "params": sum(p.numel() for p in model.parameters()), "weights": spec.get("weights", "random")}


FLUX1_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                 scaling_factor=0.3611, shift_factor=0.1159)


def vae(spec: dict) -> dict:
    """Seconds per decode (the first call warms up) of a (1, C, h/8, w/8) latent."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    dtype = getattr(torch, spec.get("dtype", "bfloat16"))
    t0 = time.perf_counter()
    if spec["family"] == "z-image-turbo":
        model, channels = _random_model(AutoencoderKL, FLUX1_VAE, dtype), 16
    else:
        model, channels = _random_model(AutoencoderKLFlux2, {}, dtype), 32
    model.eval()
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, channels, spec["height"] // 8, spec["width"] // 8, generator=g).to(dtype)
    times = []
    with torch.inference_mode():
        for _ in range(spec.get("decodes", 2) + 1):
            t1 = time.perf_counter()
            model.decode(z, return_dict=False)
            times.append(time.perf_counter() - t1)
    return {"load_s": load_s, "decodes_s": times, "decode_s": min(times[1:]), "dtype": str(dtype).replace("torch.", ""),
            "params": sum(p.numel() for p in model.parameters())}


def gemm(spec: dict) -> dict:
    """GFLOP/s of F.linear on the shapes, per dtype: each shape timed (best of reps), weighted by count."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for name in spec.get("dtypes", ["bfloat16", "float32"]):
        dtype = getattr(torch, name)
        flops = seconds = 0.0
        per_shape = []
        for rows, k, n, count in spec["shapes"]:
            x = torch.randn(rows, k, generator=g, dtype=torch.float32).to(dtype)
            w = (torch.randn(n, k, generator=g, dtype=torch.float32) * k ** -0.5).to(dtype)
            with torch.inference_mode():
                torch.nn.functional.linear(x, w)   # warm-up (oneDNN picks and caches its kernel)
                best = float("inf")
                for _ in range(spec.get("reps", 3)):
                    t1 = time.perf_counter()
                    torch.nn.functional.linear(x, w)
                    best = min(best, time.perf_counter() - t1)
            f = 2.0 * rows * k * n
            per_shape.append({"shape": [rows, k, n], "count": count, "gflops": f / best / 1e9})
            flops += f * count
            seconds += best * count
            del x, w
        out[name] = {"gflops": flops / seconds / 1e9, "shapes": per_shape}
    return out


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    result = {"gemm": gemm, "vae": vae}.get(spec.get("job", ""), transformer)(spec)
    result.update(torch=torch.__version__, threads=torch.get_num_threads(),
                  cpu_capability=torch.backends.cpu.get_cpu_capability())
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
