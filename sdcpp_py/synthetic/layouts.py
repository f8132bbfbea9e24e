"""Tensor layouts of the model families stable-diffusion.cpp runs, generated from a few sizes.

Every function here returns the ordered list of tensors of one model component, as
:class:`TensorSpec` (name, shape in PyTorch order, kind). The layouts mirror what the
pinned engine builds (``z_image.hpp``, ``flux.hpp``, ``llm.hpp``, ``auto_encoder_kl.hpp``):
with the real sizes they reproduce the real checkpoints tensor for tensor, and with
small sizes they give tiny models the engine still accepts.

``kind`` tells the writer how to fill and store a tensor:

``w``
    matrix weight of a Linear (quantisable), N(0, 1/fan_in)
``conv``
    convolution weight (the engine keeps it F16), N(0, 1/fan_in)
``norm``
    norm scale, ones
``bias``
    bias, zeros
``emb``
    token embedding, N(0, 0.02)
``vec``
    learned vector (pad tokens), N(0, 0.02)
``f32w``
    small matrix the engine forces to F32 (``Linear(..., force_f32=true)``), N(0, 1/fan_in)
``bn_mean`` / ``bn_var``
    FLUX.2 VAE latent batch-norm statistics (values the engine hard-codes)
``zero``
    a weight left at its zero initialisation (stored F32), as ControlNet Union 2.0's refiner projections
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "KINDS",
    "TensorSpec",
    "ZImageDiTConfig",
    "Flux2DiTConfig",
    "Qwen3Config",
    "VAEConfig",
    "z_image_dit",
    "flux2_dit",
    "qwen3_llm",
    "flux1_vae",
    "flux2_vae",
    "zimage_ffn_width",
    "total_params",
    "FAMILIES",
    "SIZES",
    "COMPONENTS",
    "FamilyConfig",
    "family_config",
    "component_layout",
]

KINDS: frozenset[str] = frozenset({"w", "conv", "norm", "bias", "emb", "vec", "f32w", "bn_mean", "bn_var", "zero"})

LLMNames = Literal["gguf", "hf"]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layout: name, shape in PyTorch order (out, in[, kh, kw]) and kind."""

    name: str
    shape: tuple[int, ...]
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown tensor kind {self.kind!r} for {self.name}")

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def ne(self) -> tuple[int, ...]:
        """Shape in ggml order (innermost dimension first), as GGUF stores it."""
        return tuple(reversed(self.shape))

    @property
    def row_width(self) -> int:
        """Innermost dimension (ggml ``ne[0]``), the width quantisation blocks run along."""
        return self.shape[-1] if self.shape else 1

    @property
    def fan_in(self) -> int:
        """Inputs per output unit: product of all dimensions but the first."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1


def total_params(specs: list[TensorSpec]) -> int:
    """Total number of elements of a layout."""
    return sum(s.numel for s in specs)


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZImageDiTConfig:
    """Sizes of a Z-Image DiT (head_dim 128, 16 latent channels, patch 2 are fixed)."""

    hidden: int = 3840
    layers: int = 30
    refiner_layers: int = 2
    cap_feat_dim: int = 2560

    def validate(self) -> None:
        """Reject sizes the (patched) engine cannot build or run."""
        if self.hidden % 128 != 0 or self.hidden <= 0:
            raise ValueError(f"Z-Image hidden size must be a positive multiple of head_dim 128, got {self.hidden}")
        if self.hidden < 256:
            # t_embedder outputs 256 features, the adaLN layers take MIN(hidden, 256).
            raise ValueError(f"Z-Image hidden size must be >= 256 (adaLN input is 256), got {self.hidden}")
        if self.layers < 1 or self.refiner_layers < 1 or self.cap_feat_dim < 1:
            raise ValueError("Z-Image needs >= 1 layer, >= 1 refiner layer and cap_feat_dim >= 1")


@dataclass(frozen=True)
class Flux2DiTConfig:
    """Sizes of a FLUX.2 DiT (head_dim 128, 128 input channels, patch 1, mlp_ratio 3 are fixed)."""

    hidden: int = 3072
    depth: int = 5
    depth_single: int = 20
    context_in_dim: int = 7680

    def validate(self) -> None:
        """Reject sizes the engine cannot build."""
        if self.hidden % 128 != 0 or self.hidden <= 0:
            raise ValueError(f"FLUX.2 hidden size must be a positive multiple of head_dim 128, got {self.hidden}")
        if self.depth < 1 or self.depth_single < 1 or self.context_in_dim < 1:
            raise ValueError("FLUX.2 needs >= 1 double block, >= 1 single block and context_in_dim >= 1")


@dataclass(frozen=True)
class Qwen3Config:
    """Sizes of a Qwen3 text encoder (32 heads x 128, 8 KV heads: hard-coded in the engine)."""

    hidden: int = 2560
    layers: int = 36
    intermediate: int = 9728
    vocab: int = 151936

    def validate(self) -> None:
        """Reject sizes the engine would misread or reject."""
        if self.layers < 1 or self.hidden < 1 or self.intermediate < 1:
            raise ValueError("Qwen3 needs >= 1 layer and positive widths")
        if self.layers == 28:
            # The engine takes a 28-layer Qwen3 for the 2B model and switches to 16 heads.
            raise ValueError("a 28-layer Qwen3 is read as Qwen3-2B (16 heads) by the engine; use another depth")
        if self.vocab <= 151668:
            raise ValueError(f"Qwen3 vocab must exceed 151668 (special tokens), got {self.vocab}")


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of an ldm AutoencoderKL: decoder base width (encoder width is fixed 128 in the engine)."""

    decoder_ch: int = 128
    encoder_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2

    def validate(self) -> None:
        """GroupNorm32 needs every width to be a multiple of 32."""
        if self.decoder_ch < 32 or self.decoder_ch % 32 != 0:
            raise ValueError(f"VAE decoder width must be a positive multiple of 32, got {self.decoder_ch}")
        if self.encoder_ch != 128:
            raise ValueError("the engine builds the VAE encoder with width 128")


# ---------------------------------------------------------------------------------------------
# Z-Image
# ---------------------------------------------------------------------------------------------

_ZIMAGE_HEAD_DIM = 128
_ZIMAGE_IN_CHANNELS = 16
_ZIMAGE_PATCH = 2
_ZIMAGE_ADALN_DIM = 256
_ZIMAGE_T_FREQ = 256


def zimage_ffn_width(hidden: int, multiple_of: int = 256) -> int:
    """FFN width as z_image.hpp's FeedForward computes it (float32 8/3 multiplier, rounded up)."""
    scaled = int(np.float32(np.float32(8.0) / np.float32(3.0)) * np.float32(hidden))
    return multiple_of * ((scaled + multiple_of - 1) // multiple_of)


def zimage_block(prefix: str, hidden: int, modulation: bool, diffusers_names: bool = False) -> list[TensorSpec]:
    """One Z-Image transformer block; ``diffusers_names``: attention as diffusers names it (separate
    ``to_q``/``to_k``/``to_v``, ``to_out.0``, ``norm_q``/``norm_k``), as ControlNet files do."""
    ffn = zimage_ffn_width(hidden)
    heads = hidden // _ZIMAGE_HEAD_DIM
    width = heads * _ZIMAGE_HEAD_DIM
    if diffusers_names:
        attention = [TensorSpec(f"{prefix}.attention.to_{x}.weight", (width, hidden), "w") for x in "qkv"]
        attention.append(TensorSpec(f"{prefix}.attention.to_out.0.weight", (hidden, width), "w"))
    else:
        attention = [TensorSpec(f"{prefix}.attention.qkv.weight", (3 * width, hidden), "w"),
                     TensorSpec(f"{prefix}.attention.out.weight", (hidden, width), "w")]
    q_norm, k_norm = ("norm_q", "norm_k") if diffusers_names else ("q_norm", "k_norm")
    specs = attention + [
        TensorSpec(f"{prefix}.attention.{q_norm}.weight", (_ZIMAGE_HEAD_DIM,), "norm"),
        TensorSpec(f"{prefix}.attention.{k_norm}.weight", (_ZIMAGE_HEAD_DIM,), "norm"),
        TensorSpec(f"{prefix}.feed_forward.w1.weight", (ffn, hidden), "w"),
        TensorSpec(f"{prefix}.feed_forward.w2.weight", (hidden, ffn), "w"),
        TensorSpec(f"{prefix}.feed_forward.w3.weight", (ffn, hidden), "w"),
        TensorSpec(f"{prefix}.attention_norm1.weight", (hidden,), "norm"),
        TensorSpec(f"{prefix}.ffn_norm1.weight", (hidden,), "norm"),
        TensorSpec(f"{prefix}.attention_norm2.weight", (hidden,), "norm"),
        TensorSpec(f"{prefix}.ffn_norm2.weight", (hidden,), "norm"),
    ]
    if modulation:
        adaln_in = min(hidden, _ZIMAGE_ADALN_DIM)
        specs += [
            TensorSpec(f"{prefix}.adaLN_modulation.0.weight", (4 * hidden, adaln_in), "w"),
            TensorSpec(f"{prefix}.adaLN_modulation.0.bias", (4 * hidden,), "bias"),
        ]
    return specs


def z_image_dit(cfg: ZImageDiTConfig = ZImageDiTConfig()) -> list[TensorSpec]:
    """Z-Image(-Turbo) DiT, prefix-free names (the engine adds ``model.diffusion_model.``)."""
    cfg.validate()
    h = cfg.hidden
    t_width = min(h, 1024)
    adaln_in = min(h, _ZIMAGE_ADALN_DIM)
    patch_ch = _ZIMAGE_PATCH * _ZIMAGE_PATCH * _ZIMAGE_IN_CHANNELS
    specs = [
        TensorSpec("cap_pad_token", (h,), "vec"),
        TensorSpec("x_pad_token", (h,), "vec"),
        TensorSpec("x_embedder.weight", (h, patch_ch), "w"),
        TensorSpec("x_embedder.bias", (h,), "bias"),
        TensorSpec("t_embedder.mlp.0.weight", (t_width, _ZIMAGE_T_FREQ), "f32w"),
        TensorSpec("t_embedder.mlp.0.bias", (t_width,), "bias"),
        TensorSpec("t_embedder.mlp.2.weight", (_ZIMAGE_ADALN_DIM, t_width), "f32w"),
        TensorSpec("t_embedder.mlp.2.bias", (_ZIMAGE_ADALN_DIM,), "bias"),
        TensorSpec("cap_embedder.0.weight", (cfg.cap_feat_dim,), "norm"),
        TensorSpec("cap_embedder.1.weight", (h, cfg.cap_feat_dim), "w"),
        TensorSpec("cap_embedder.1.bias", (h,), "bias"),
    ]
    for i in range(cfg.refiner_layers):
        specs += zimage_block(f"noise_refiner.{i}", h, modulation=True)
    for i in range(cfg.refiner_layers):
        specs += zimage_block(f"context_refiner.{i}", h, modulation=False)
    for i in range(cfg.layers):
        specs += zimage_block(f"layers.{i}", h, modulation=True)
    specs += [
        TensorSpec("final_layer.linear.weight", (patch_ch, h), "f32w"),
        TensorSpec("final_layer.linear.bias", (patch_ch,), "bias"),
        TensorSpec("final_layer.adaLN_modulation.1.weight", (h, adaln_in), "w"),
        TensorSpec("final_layer.adaLN_modulation.1.bias", (h,), "bias"),
    ]
    return specs


# ---------------------------------------------------------------------------------------------
# FLUX.2
# ---------------------------------------------------------------------------------------------

_FLUX2_HEAD_DIM = 128
_FLUX2_IN_CHANNELS = 128
_FLUX2_MLP_RATIO = 3


def flux2_dit(cfg: Flux2DiTConfig = Flux2DiTConfig()) -> list[TensorSpec]:
    """FLUX.2 (Klein) DiT with the original BFL names; no biases (``disable_bias``)."""
    cfg.validate()
    h = cfg.hidden
    mlp = h * _FLUX2_MLP_RATIO
    hd = _FLUX2_HEAD_DIM
    specs = [
        TensorSpec("img_in.weight", (h, _FLUX2_IN_CHANNELS), "w"),
        TensorSpec("time_in.in_layer.weight", (h, 256), "w"),
        TensorSpec("time_in.out_layer.weight", (h, h), "w"),
        TensorSpec("txt_in.weight", (h, cfg.context_in_dim), "w"),
    ]
    for i in range(cfg.depth):
        p = f"double_blocks.{i}"
        for stream in ("img", "txt"):
            specs += [
                TensorSpec(f"{p}.{stream}_attn.qkv.weight", (3 * h, h), "w"),
                TensorSpec(f"{p}.{stream}_attn.norm.query_norm.scale", (hd,), "norm"),
                TensorSpec(f"{p}.{stream}_attn.norm.key_norm.scale", (hd,), "norm"),
                TensorSpec(f"{p}.{stream}_attn.proj.weight", (h, h), "w"),
                TensorSpec(f"{p}.{stream}_mlp.0.weight", (2 * mlp, h), "w"),
                TensorSpec(f"{p}.{stream}_mlp.2.weight", (h, mlp), "w"),
            ]
    for i in range(cfg.depth_single):
        p = f"single_blocks.{i}"
        specs += [
            TensorSpec(f"{p}.linear1.weight", (3 * h + 2 * mlp, h), "w"),
            TensorSpec(f"{p}.linear2.weight", (h, h + mlp), "w"),
            TensorSpec(f"{p}.norm.query_norm.scale", (hd,), "norm"),
            TensorSpec(f"{p}.norm.key_norm.scale", (hd,), "norm"),
        ]
    specs += [
        TensorSpec("final_layer.linear.weight", (_FLUX2_IN_CHANNELS, h), "w"),
        TensorSpec("final_layer.adaLN_modulation.1.weight", (2 * h, h), "w"),
        TensorSpec("double_stream_modulation_img.lin.weight", (6 * h, h), "w"),
        TensorSpec("double_stream_modulation_txt.lin.weight", (6 * h, h), "w"),
        TensorSpec("single_stream_modulation.lin.weight", (3 * h, h), "w"),
    ]
    return specs


# ---------------------------------------------------------------------------------------------
# Qwen3
# ---------------------------------------------------------------------------------------------

_QWEN3_HEADS = 32
_QWEN3_KV_HEADS = 8
_QWEN3_HEAD_DIM = 128

# (llama.cpp GGUF name, Hugging Face name) of each per-layer tensor, in checkpoint order.
_QWEN3_LAYER_NAMES: tuple[tuple[str, str], ...] = (
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
)


def qwen3_llm(cfg: Qwen3Config = Qwen3Config(), names: LLMNames = "gguf") -> list[TensorSpec]:
    """Qwen3 text encoder (no LM head: tied embeddings), llama.cpp (``gguf``) or HF (``hf``) names."""
    cfg.validate()
    if names not in ("gguf", "hf"):
        raise ValueError(f"names must be 'gguf' or 'hf', got {names!r}")
    gguf = names == "gguf"
    h, inter = cfg.hidden, cfg.intermediate
    q_out = _QWEN3_HEADS * _QWEN3_HEAD_DIM
    kv_out = _QWEN3_KV_HEADS * _QWEN3_HEAD_DIM
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "attn_norm": ((h,), "norm"),
        "attn_q": ((q_out, h), "w"),
        "attn_k": ((kv_out, h), "w"),
        "attn_v": ((kv_out, h), "w"),
        "attn_output": ((h, q_out), "w"),
        "attn_q_norm": ((_QWEN3_HEAD_DIM,), "norm"),
        "attn_k_norm": ((_QWEN3_HEAD_DIM,), "norm"),
        "ffn_norm": ((h,), "norm"),
        "ffn_gate": ((inter, h), "w"),
        "ffn_up": ((inter, h), "w"),
        "ffn_down": ((h, inter), "w"),
    }
    specs = [TensorSpec("token_embd.weight" if gguf else "model.embed_tokens.weight", (cfg.vocab, h), "emb")]
    for i in range(cfg.layers):
        for gguf_name, hf_name in _QWEN3_LAYER_NAMES:
            shape, kind = shapes[gguf_name]
            name = f"blk.{i}.{gguf_name}.weight" if gguf else f"model.layers.{i}.{hf_name}.weight"
            specs.append(TensorSpec(name, shape, kind))
    specs.append(TensorSpec("output_norm.weight" if gguf else "model.norm.weight", (h,), "norm"))
    return specs


# ---------------------------------------------------------------------------------------------
# VAEs (ldm AutoencoderKL names)
# ---------------------------------------------------------------------------------------------


def _resnet(prefix: str, c_in: int, c_out: int) -> list[TensorSpec]:
    specs = [
        TensorSpec(f"{prefix}.norm1.weight", (c_in,), "norm"),
        TensorSpec(f"{prefix}.norm1.bias", (c_in,), "bias"),
        TensorSpec(f"{prefix}.conv1.weight", (c_out, c_in, 3, 3), "conv"),
        TensorSpec(f"{prefix}.conv1.bias", (c_out,), "bias"),
        TensorSpec(f"{prefix}.norm2.weight", (c_out,), "norm"),
        TensorSpec(f"{prefix}.norm2.bias", (c_out,), "bias"),
        TensorSpec(f"{prefix}.conv2.weight", (c_out, c_out, 3, 3), "conv"),
        TensorSpec(f"{prefix}.conv2.bias", (c_out,), "bias"),
    ]
    if c_in != c_out:
        specs += [
            TensorSpec(f"{prefix}.nin_shortcut.weight", (c_out, c_in, 1, 1), "conv"),
            TensorSpec(f"{prefix}.nin_shortcut.bias", (c_out,), "bias"),
        ]
    return specs


def _conv(prefix: str, c_out: int, c_in: int, k: int) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.weight", (c_out, c_in, k, k), "conv"),
        TensorSpec(f"{prefix}.bias", (c_out,), "bias"),
    ]


def _norm(prefix: str, c: int) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.weight", (c,), "norm"), TensorSpec(f"{prefix}.bias", (c,), "bias")]


def _attn(prefix: str, c: int) -> list[TensorSpec]:
    specs = _norm(f"{prefix}.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        specs += _conv(f"{prefix}.{name}", c, c, 1)
    return specs


def _mid(prefix: str, c: int) -> list[TensorSpec]:
    return _resnet(f"{prefix}.block_1", c, c) + _attn(f"{prefix}.attn_1", c) + _resnet(f"{prefix}.block_2", c, c)


def _encoder(cfg: VAEConfig, z_channels: int) -> list[TensorSpec]:
    ch = cfg.encoder_ch
    specs = _conv("encoder.conv_in", ch, 3, 3)
    c_in = ch
    for i, mult in enumerate(cfg.ch_mult):
        c_out = ch * mult
        for j in range(cfg.num_res_blocks):
            specs += _resnet(f"encoder.down.{i}.block.{j}", c_in, c_out)
            c_in = c_out
        if i != len(cfg.ch_mult) - 1:
            specs += _conv(f"encoder.down.{i}.downsample.conv", c_in, c_in, 3)
    specs += _mid("encoder.mid", c_in)
    specs += _norm("encoder.norm_out", c_in)
    specs += _conv("encoder.conv_out", 2 * z_channels, c_in, 3)  # double_z
    return specs


def _decoder(cfg: VAEConfig, z_channels: int) -> list[TensorSpec]:
    ch = cfg.decoder_ch
    c = ch * cfg.ch_mult[-1]
    specs = _conv("decoder.conv_in", c, z_channels, 3)
    specs += _mid("decoder.mid", c)
    for i in reversed(range(len(cfg.ch_mult))):
        c_out = ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            specs += _resnet(f"decoder.up.{i}.block.{j}", c, c_out)
            c = c_out
        if i != 0:
            specs += _conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    specs += _norm("decoder.norm_out", c)
    specs += _conv("decoder.conv_out", 3, c, 3)
    return specs


def flux1_vae(cfg: VAEConfig = VAEConfig()) -> list[TensorSpec]:
    """FLUX.1 autoencoder (16 latent channels, no quant convs), used by Z-Image-Turbo."""
    cfg.validate()
    z = 16
    return _encoder(cfg, z) + _decoder(cfg, z)


def flux2_vae(cfg: VAEConfig = VAEConfig()) -> list[TensorSpec]:
    """FLUX.2 autoencoder (32 latent channels, quant convs, 2x2-patched latent batch-norm stats)."""
    cfg.validate()
    z = 32
    specs = _encoder(cfg, z)
    specs += _conv("quant_conv", 2 * z, 2 * z, 1)
    specs += _conv("post_quant_conv", z, z, 1)
    specs += _decoder(cfg, z)
    specs += [
        TensorSpec("bn.running_mean", (4 * z,), "bn_mean"),
        TensorSpec("bn.running_var", (4 * z,), "bn_var"),
        TensorSpec("bn.num_batches_tracked", (), "bias"),
    ]
    return specs


# ---------------------------------------------------------------------------------------------
# Named configurations
# ---------------------------------------------------------------------------------------------

FAMILIES: tuple[str, ...] = ("z-image-turbo", "flux2-klein")
SIZES: tuple[str, ...] = ("tiny", "full")
COMPONENTS: tuple[str, ...] = ("dit", "llm", "vae")


@dataclass(frozen=True)
class FamilyConfig:
    """Sizes of the three components of one family at one named size."""

    family: str
    size: str
    dit: ZImageDiTConfig | Flux2DiTConfig
    llm: Qwen3Config
    vae: VAEConfig


# Qwen3-4B, shared by both families at full size.
_QWEN3_FULL = Qwen3Config(hidden=2560, layers=36, intermediate=9728, vocab=151936)
# With fewer than 9 layers both conditioners use the final-norm output: context width = hidden.
_QWEN3_TINY = Qwen3Config(hidden=64, layers=2, intermediate=128, vocab=151936)

_CONFIGS: dict[tuple[str, str], FamilyConfig] = {
    ("z-image-turbo", "full"): FamilyConfig(
        "z-image-turbo", "full",
        ZImageDiTConfig(hidden=3840, layers=30, refiner_layers=2, cap_feat_dim=2560),
        _QWEN3_FULL, VAEConfig(decoder_ch=128),
    ),
    ("z-image-turbo", "tiny"): FamilyConfig(
        "z-image-turbo", "tiny",
        ZImageDiTConfig(hidden=256, layers=1, refiner_layers=1, cap_feat_dim=_QWEN3_TINY.hidden),
        _QWEN3_TINY, VAEConfig(decoder_ch=32),
    ),
    ("flux2-klein", "full"): FamilyConfig(
        "flux2-klein", "full",
        # Klein concatenates Qwen3 layers 9/18/27: context = 3 x hidden.
        Flux2DiTConfig(hidden=3072, depth=5, depth_single=20, context_in_dim=3 * _QWEN3_FULL.hidden),
        _QWEN3_FULL, VAEConfig(decoder_ch=128),
    ),
    ("flux2-klein", "tiny"): FamilyConfig(
        "flux2-klein", "tiny",
        Flux2DiTConfig(hidden=128, depth=1, depth_single=1, context_in_dim=_QWEN3_TINY.hidden),
        _QWEN3_TINY, VAEConfig(decoder_ch=32),
    ),
}


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def family_config(family: str, size: str) -> FamilyConfig:
    """The named configuration of ``family`` ("z-image-turbo" | "flux2-klein") at ``size`` ("tiny" | "full")."""
    _check_choice("family", family, FAMILIES)
    _check_choice("size", size, SIZES)
    return _CONFIGS[(family, size)]


def component_layout(family: str, component: str, size: str = "tiny", *,
                     llm_names: LLMNames = "gguf") -> list[TensorSpec]:
    """Tensor list of one component ("dit" | "llm" | "vae") of a named configuration."""
    _check_choice("component", component, COMPONENTS)
    cfg = family_config(family, size)
    if component == "dit":
        if isinstance(cfg.dit, ZImageDiTConfig):
            return z_image_dit(cfg.dit)
        return flux2_dit(cfg.dit)
    if component == "llm":
        return qwen3_llm(cfg.llm, names=llm_names)
    return flux1_vae(cfg.vae) if family == "z-image-turbo" else flux2_vae(cfg.vae)
