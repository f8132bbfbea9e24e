"""The Z-Image ControlNet Union in the engine against the reference: diffusers' Z-Image transformer
and ZImageControlNetModel (diffusers 0.42.1) with the same small random weights, latent,
conditioning and sigma, the 2.x refiner hints added to the main model's noise-refiner outputs as
the authors' code (VideoX-Fun) adds them; diffusers adds them only inside the ControlNet's own
pass, so the reference puts them where the authors do with forward hooks.

Everything is float32 on both sides (F32 weights, no repacking, no BF16 expansion). The one
difference left on purpose is the engine's Z-Image q/k RMSNorm epsilon (1e-6; the model's
config says 1e-5), which the reference is given too, so the bound below is float32 rounding
(different summation orders of the same products; stated in the test).

Needs torch and diffusers (``pip install -e .[parity]``); skipped without them.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from sdcpp_py import Pipeline
from sdcpp_py.backends import cpu_kernels
from sdcpp_py.staged import Latent
from sdcpp_py.synthetic import control_channels, control_places, write_controlnet, write_model_set
from sdcpp_py.synthetic.layouts import ZImageDiTConfig, family_config, z_image_dit
from sdcpp_py.synthetic.writer import plan_tensors, write_file

try:
    import diffusers  # noqa: F401
    import safetensors.torch as safetensors_torch
    import torch
except ImportError as e:      # SDCPP_PY_REQUIRE_PARITY=1 (CI): the reference must be there
    if os.environ.get("SDCPP_PY_REQUIRE_PARITY") == "1":
        raise RuntimeError(f"the parity tests need torch and diffusers (pip install .[parity]): {e}") from None
    pytest.skip(f"torch and diffusers are not installed ({e})", allow_module_level=True)

from diffusers import ZImageControlNetModel, ZImageTransformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers  # noqa: E402

SIGMA = 0.7          # one Euler step from this sigma to 0
SIZE = 64            # pixels: an 8x8 latent, 16 image tokens (padded to 32)
# float32 rounding: the two differ by ~2e-6 of the step's scale (measured: 3e-6 to 6e-6 at a
# scale of 3.4; summation orders in 384- to 1024-wide dot products and soft_max differ); the bound
# is 10x that, while a wrong hint (layer, strength, order, the refiner hints left out) moves the
# step by more than 0.1 of its scale.
BOUND = 2e-5
# BF16 attention operands (8-bit mantissas): measured 2.5e-3 of the scale; the probability pairs'
# halves swapped against the values' moved it by 0.29
BF16_BOUND = 1e-2


@pytest.fixture(scope="module")
def parity_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    tiny = write_model_set("z-image-turbo", d)
    cap = family_config("z-image-turbo", "tiny").llm.hidden
    # 384 wide: diffusers' FFN width int(dim / 3 * 8) and the engine's (rounded up to 256) agree
    cfg = ZImageDiTConfig(hidden=384, layers=4, refiner_layers=2, cap_feat_dim=cap)
    dit = d / "z-image-parity-dit-f32.safetensors"
    # diffusers' t_embedder is 1024 wide at any width (the engine reads the width from the file)
    t_shapes = {"t_embedder.mlp.0.weight": (1024, 256), "t_embedder.mlp.0.bias": (1024,),
                "t_embedder.mlp.2.weight": (256, 1024)}
    specs = [dataclasses.replace(s, shape=t_shapes.get(s.name, s.shape)) for s in z_image_dit(cfg)]
    write_file(dit, plan_tensors(specs, "f32", "safetensors"), seed=3, metadata={}, fmt="safetensors")
    nets = {v: write_controlnet(d, v, dit=cfg, wtype="f32", seed=5, name=f"cn-{v}.safetensors")
            for v in ("1.0", "2.0", "2.1")}
    return tiny, cfg, dit, nets


def _reference(cfg: ZImageDiTConfig, dit_path, cn_path, variant: str):
    state = {k: v.float() for k, v in safetensors_torch.load_file(str(dit_path)).items()}
    for name in ("x_pad_token", "cap_pad_token"):
        state[name] = state[name][None]
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=cfg.hidden, n_layers=cfg.layers,
        n_refiner_layers=cfg.refiner_layers, n_heads=cfg.hidden // 128, n_kv_heads=cfg.hidden // 128,
        norm_eps=1e-5, qk_norm=True, cap_feat_dim=cfg.cap_feat_dim, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])
    missing, unexpected = transformer.load_state_dict(convert_z_image_transformer_checkpoint_to_diffusers(state),
                                                      strict=False)
    assert not unexpected and all("norm_final" in k or "pad_token" in k for k in missing), (missing, unexpected)
    mode = {"1.0": None, "2.0": "control_layers", "2.1": "control_noise_refiner"}[variant]
    controlnet = ZImageControlNetModel(
        control_layers_places=control_places(variant, cfg.layers),
        control_refiner_layers_places=list(range(cfg.refiner_layers)), control_in_dim=control_channels(variant),
        add_control_noise_refiner=mode, dim=cfg.hidden, n_refiner_layers=cfg.refiner_layers,
        n_heads=cfg.hidden // 128, n_kv_heads=cfg.hidden // 128, norm_eps=1e-5, qk_norm=True)
    cn_state = {k: v.float() for k, v in safetensors_torch.load_file(str(cn_path)).items()}
    if mode == "control_layers":   # 2.0: its zero-initialised refiner blocks are never used
        cn_state = {k: v for k, v in cn_state.items() if not k.startswith("control_noise_refiner.")}
    controlnet.load_state_dict(cn_state, strict=True)
    ZImageControlNetModel.from_transformer(controlnet, transformer)
    for module in list(transformer.modules()) + list(controlnet.modules()):
        for name in ("norm_q", "norm_k"):           # the engine's q/k RMSNorm epsilon
            norm = getattr(module, name, None)
            if norm is not None and hasattr(norm, "eps"):
                norm.eps = 1e-6
    return transformer.eval(), controlnet.eval()


def _reference_step(transformer, controlnet, variant, noise, context, control, strength, authors=True):
    """One Euler step of the reference from SIGMA to 0 (diffusers' Z-Image pipeline conventions);
    ``authors=False``: diffusers 0.42.1's own 2.x (no refiner hints on the main model)."""
    x = torch.from_numpy(noise[0] * SIGMA)[:, None]                  # (C, F=1, h, w)
    t = torch.tensor([1.0 - SIGMA])                                  # the pipeline's (1000 - t) / 1000
    cap = [torch.from_numpy(context)]
    samples, refiner_hints = None, []
    with torch.no_grad():
        if control is not None:
            # the 2.x refiner pass's hints: after_proj of the blocks it runs, in order
            blocks = {"2.0": controlnet.control_layers, "2.1": controlnet.control_noise_refiner}.get(variant, [])
            hooks = [b.after_proj.register_forward_hook(lambda m, i, o: refiner_hints.append(o))
                     for b in list(blocks)[:transformer.config.n_refiner_layers]]
            samples = controlnet([x], t, cap, [torch.from_numpy(control[0])[:, None]], conditioning_scale=strength)
            for h in hooks:
                h.remove()
            refiner_hints = refiner_hints[:transformer.config.n_refiner_layers]
        # the authors add the refiner hints to the main model's noise-refiner outputs
        hooks = [layer.register_forward_hook(lambda m, i, o, j=j: o + refiner_hints[j] * strength)
                 for j, layer in enumerate(transformer.noise_refiner) if authors and j < len(refiner_hints)]
        out = transformer([x], t, cap, controlnet_block_samples=samples, return_dict=False)[0][0]
        for h in hooks:
            h.remove()
    return (x + SIGMA * out)[:, 0].numpy()[None]                      # x + (0 - sigma) * (-out)


@pytest.mark.parametrize("variant", ["1.0", "2.0", "2.1"])
def test_controlnet_steps_equal_the_reference(parity_files, variant):
    tiny, cfg, dit, nets = parity_files
    transformer, controlnet = _reference(cfg, dit, nets[variant], variant)
    rng = np.random.default_rng(11)
    noise = rng.standard_normal((1, 16, SIZE // 8, SIZE // 8)).astype(np.float32)
    control = rng.standard_normal((1, control_channels(variant), SIZE // 8, SIZE // 8)).astype(np.float32)
    with Pipeline(diffusion_model=dit, llm=tiny.llm, vae=tiny.vae, controlnet=nets[variant], n_threads=2,
                  upcast="none", repack="none", bf16_attention=False) as p:   # F32 attention: BOUND is F32's
        cond = p.encode("a red cube on a table")
        assert p.controlnet_loaded == {}                                # loaded on first use
        ctrl = Latent(control, p.family, 8, 0, {"control": True})

        def ours(strength: float, with_control: bool = True) -> np.ndarray:
            return p.denoise(cond, noise=noise, control=ctrl if with_control else None, width=SIZE, height=SIZE,
                             sigmas=(SIGMA, 0.0), sampler="euler", control_strength=strength).data

        plain = ours(0.0, with_control=False)
        ref_plain = _reference_step(transformer, controlnet, variant, noise, cond.context, None, 0.0)
        scale = float(np.abs(ref_plain).max())
        assert np.abs(plain - ref_plain).max() <= BOUND * scale       # the DiT itself, as a baseline
        assert (ours(0.0) == plain).all()                               # strength 0: the plain DiT, bit for bit
        assert p.controlnet_loaded["variant"] == variant
        for strength in (0.5, 1.0):
            got = ours(strength)
            want = _reference_step(transformer, controlnet, variant, noise, cond.context, control, strength)
            effect = float(np.abs(want - ref_plain).max())
            assert effect > 100 * BOUND * scale                         # the ControlNet changes the step
            assert np.abs(got - want).max() <= BOUND * scale, (strength, np.abs(got - want).max(), scale)
            if variant != "1.0":   # the authors' refiner hints, not diffusers 0.42.1's placement
                theirs = _reference_step(transformer, controlnet, variant, noise, cond.context, control, strength,
                                         authors=False)
                assert np.abs(got - theirs).max() > 100 * BOUND * scale


def test_bf16_attention_step_is_near_the_reference(parity_files):
    """The DiT's attention on the BF16 flash tiles (vendor/patches/0020, the default where the CPU
    module has AVX512-BF16) against diffusers' F32 step: off by BF16 rounding of Q, K, V and the
    probabilities (F32 sums), far inside what a wrong tile (a key pair swapped, a stale maximum)
    would move it. Without AVX512-BF16 the setting changes nothing."""
    tiny, cfg, dit, nets = parity_files
    transformer, controlnet = _reference(cfg, dit, nets["1.0"], "1.0")
    noise = np.random.default_rng(12).standard_normal((1, 16, SIZE // 8, SIZE // 8)).astype(np.float32)
    steps = {}
    for bf16 in (False, True):
        with Pipeline(diffusion_model=dit, llm=tiny.llm, vae=tiny.vae, n_threads=2, upcast="none", repack="none",
                      bf16_attention=bf16) as p:
            cond = p.encode("a red cube on a table")
            steps[bf16] = p.denoise(cond, noise=noise, width=SIZE, height=SIZE, sigmas=(SIGMA, 0.0),
                                    sampler="euler").data
    ref = _reference_step(transformer, controlnet, "1.0", noise, cond.context, None, 0.0)
    scale = float(np.abs(ref).max())
    assert np.abs(steps[False] - ref).max() <= BOUND * scale
    err = float(np.abs(steps[True] - ref).max())
    if "AVX512_BF16" in cpu_kernels().features:
        assert BOUND * scale < err <= BF16_BOUND * scale, (err, scale)
    else:
        assert np.array_equal(steps[True], steps[False])
