"""Random tensor contents for synthetic models, generated chunk by chunk.

Every tensor draws from its own random stream, seeded from the model seed and the tensor
name through SHA-256, so a file is reproducible byte for byte for a given seed, whatever
else is in the file and in whatever order it is written (given numpy's PCG64 stream, which
numpy keeps stable, and the platform's libm for the normal quantile table).

Values keep a forward pass finite: Linear and conv weights N(0, 1/fan_in), embeddings and
learned vectors N(0, 0.02), norm scales 1, biases 0, and the FLUX.2 VAE batch-norm
statistics set to the latent mean/std stable-diffusion.cpp hard-codes. Normal values are
drawn by inverse-CDF lookup (uniform 16-bit index into a table of 65536 normal quantiles),
about 4x faster than ``standard_normal`` and indistinguishable for this purpose.

Quantised tensors are written as random blocks directly (an f16 scale plus random codes
drawn from a symmetric, zero-mean code distribution) with the scale chosen so that the
dequantised values have the target standard deviation: much faster than quantising
floats, and statistically what a quantised N(0, sigma) weight looks like to the engine.
K-quants (Q4_K, Q6_K) get constant sub-block scales; where the codes' mean is not zero
(Q6_K, IQ4_NL's non-linear table) the sign of the block scale alternates, so rows stay
zero-mean. A full-size Q4_K Z-Image DiT (3.5 GB) is written in ~14 s.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import statistics
from collections.abc import Iterator

import numpy as np

from .dtypes import GGMLType
from .layouts import TensorSpec

__all__ = [
    "CHUNK_ELEMS",
    "FLUX2_BN_MEAN",
    "FLUX2_BN_STD",
    "FLUX2_BN_EPS",
    "tensor_rng",
    "target_std",
    "iter_tensor_bytes",
    "dequantize",
]

log = logging.getLogger("sdcpp_py.synthetic")

# Elements generated per step. Part of the reproducibility contract: the bytes of a
# tensor depend on how its random stream is cut, so changing this changes files.
CHUNK_ELEMS = 1 << 22
_TABLE_SIZE = 1 << 16

EMB_STD = 0.02
VEC_STD = 0.02

# FLUX.2 VAE latent statistics hard-coded in stable-diffusion.cpp (auto_encoder_kl.hpp,
# get_latents_mean_std): per-channel mean and std of the 2x2-patched 128-channel latent.
FLUX2_BN_MEAN: tuple[float, ...] = (
    -0.0676, -0.0715, -0.0753, -0.0745, 0.0223, 0.0180, 0.0142, 0.0184,
    -0.0001, -0.0063, -0.0002, -0.0031, -0.0272, -0.0281, -0.0276, -0.0290,
    -0.0769, -0.0672, -0.0902, -0.0892, 0.0168, 0.0152, 0.0079, 0.0086,
    0.0083, 0.0015, 0.0003, -0.0043, -0.0439, -0.0419, -0.0438, -0.0431,
    -0.0102, -0.0132, -0.0066, -0.0048, -0.0311, -0.0306, -0.0279, -0.0180,
    0.0030, 0.0015, 0.0126, 0.0145, 0.0347, 0.0338, 0.0337, 0.0283,
    0.0020, 0.0047, 0.0047, 0.0050, 0.0123, 0.0081, 0.0081, 0.0146,
    0.0681, 0.0679, 0.0767, 0.0732, -0.0462, -0.0474, -0.0392, -0.0511,
    -0.0528, -0.0477, -0.0470, -0.0517, -0.0317, -0.0316, -0.0345, -0.0283,
    0.0510, 0.0445, 0.0578, 0.0458, -0.0412, -0.0458, -0.0487, -0.0467,
    -0.0088, -0.0106, -0.0088, -0.0046, -0.0376, -0.0432, -0.0436, -0.0499,
    0.0118, 0.0166, 0.0203, 0.0279, 0.0113, 0.0129, 0.0016, 0.0072,
    -0.0118, -0.0018, -0.0141, -0.0054, -0.0091, -0.0138, -0.0145, -0.0187,
    0.0323, 0.0305, 0.0259, 0.0300, 0.0540, 0.0614, 0.0495, 0.0590,
    -0.0511, -0.0603, -0.0478, -0.0524, -0.0227, -0.0274, -0.0154, -0.0255,
    -0.0572, -0.0565, -0.0518, -0.0496, 0.0116, 0.0054, 0.0163, 0.0104,
)
FLUX2_BN_STD: tuple[float, ...] = (
    1.8029, 1.7786, 1.7868, 1.7837, 1.7717, 1.7590, 1.7610, 1.7479,
    1.7336, 1.7373, 1.7340, 1.7343, 1.8626, 1.8527, 1.8629, 1.8589,
    1.7593, 1.7526, 1.7556, 1.7583, 1.7363, 1.7400, 1.7355, 1.7394,
    1.7342, 1.7246, 1.7392, 1.7304, 1.7551, 1.7513, 1.7559, 1.7488,
    1.8449, 1.8454, 1.8550, 1.8535, 1.8240, 1.7813, 1.7854, 1.7945,
    1.8047, 1.7876, 1.7695, 1.7676, 1.7782, 1.7667, 1.7925, 1.7848,
    1.7579, 1.7407, 1.7483, 1.7368, 1.7961, 1.7998, 1.7920, 1.7925,
    1.7780, 1.7747, 1.7727, 1.7749, 1.7526, 1.7447, 1.7657, 1.7495,
    1.7775, 1.7720, 1.7813, 1.7813, 1.8162, 1.8013, 1.8023, 1.8033,
    1.7527, 1.7331, 1.7563, 1.7482, 1.7610, 1.7507, 1.7681, 1.7613,
    1.7665, 1.7545, 1.7828, 1.7726, 1.7896, 1.7999, 1.7864, 1.7760,
    1.7613, 1.7625, 1.7560, 1.7577, 1.7783, 1.7671, 1.7810, 1.7799,
    1.7201, 1.7068, 1.7265, 1.7091, 1.7793, 1.7578, 1.7502, 1.7455,
    1.7587, 1.7500, 1.7525, 1.7362, 1.7616, 1.7572, 1.7444, 1.7430,
    1.7509, 1.7610, 1.7634, 1.7612, 1.7254, 1.7135, 1.7321, 1.7226,
    1.7664, 1.7624, 1.7718, 1.7664, 1.7457, 1.7441, 1.7569, 1.7530,
)
# The checkpoint stores running_var; readers (diffusers AutoencoderKLFlux2) use
# sqrt(running_var + eps) with batch_norm_eps 1e-4, so running_var = std^2 - eps.
FLUX2_BN_EPS = 1e-4


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of one tensor: PCG64 seeded with SHA-256 of (seed, name)."""
    digest = hashlib.sha256(f"sdcpp_py.synthetic:{int(seed)}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def target_std(spec: TensorSpec) -> float:
    """Standard deviation of the random values of ``spec`` (0 for constant kinds)."""
    if spec.kind in ("w", "conv", "f32w"):
        return 1.0 / math.sqrt(spec.fan_in)
    if spec.kind == "emb":
        return EMB_STD
    if spec.kind == "vec":
        return VEC_STD
    return 0.0


# ---------------------------------------------------------------------------------------------
# Float types
# ---------------------------------------------------------------------------------------------


def _encode_float(x: np.ndarray, gtype: GGMLType) -> np.ndarray:
    """float32 array -> array holding the bytes of ``gtype`` (F32, F16 or BF16)."""
    if gtype.name == "f32":
        return x
    if gtype.name == "f16":
        return x.astype(np.float16)
    if gtype.name == "bf16":
        u = x.view(np.uint32)
        return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    raise ValueError(f"{gtype.name} is not a float type")


def _constant_values(spec: TensorSpec) -> np.ndarray | float:
    """Values of a constant-kind tensor: an array or a fill value."""
    if spec.kind in ("bn_mean", "bn_var"):
        if spec.numel != len(FLUX2_BN_MEAN):
            log.warning("%s: %d channels, no hard-coded statistics; using %s",
                        spec.name, spec.numel, "0" if spec.kind == "bn_mean" else "1")
            return 0.0 if spec.kind == "bn_mean" else 1.0
        if spec.kind == "bn_mean":
            return np.asarray(FLUX2_BN_MEAN, dtype=np.float32)
        std = np.asarray(FLUX2_BN_STD, dtype=np.float64)
        return (std * std - FLUX2_BN_EPS).astype(np.float32)
    if spec.kind == "norm":
        return 1.0
    return 0.0  # bias


@functools.lru_cache(maxsize=1)
def _normal_table() -> np.ndarray:
    """65536 quantiles of N(0, 1) at (i + 0.5) / 65536, rescaled to unit RMS (float64).

    Indexing it with uniform random 16-bit integers samples a (finely discretised,
    +-4.3 sigma truncated) normal distribution several times faster than
    ``Generator.standard_normal``, which matters for multi-GB files.
    """
    inv = statistics.NormalDist().inv_cdf
    half = np.array([inv((i + 0.5) / _TABLE_SIZE) for i in range(_TABLE_SIZE // 2, _TABLE_SIZE)])
    table = np.concatenate([-half[::-1], half])
    unit: np.ndarray = table / np.sqrt(np.mean(table * table))
    return unit


def _iter_float(spec: TensorSpec, gtype: GGMLType, seed: int) -> Iterator[np.ndarray]:
    n = spec.numel
    std = target_std(spec)
    if std == 0.0:
        values = _constant_values(spec)
        if isinstance(values, np.ndarray):
            yield _encode_float(values, gtype)
            return
        for start in range(0, n, CHUNK_ELEMS):
            yield _encode_float(np.full(min(CHUNK_ELEMS, n - start), values, dtype=np.float32), gtype)
        return
    rng = tensor_rng(seed, spec.name)
    table = _encode_float((_normal_table() * std).astype(np.float32), gtype)
    for start in range(0, n, CHUNK_ELEMS):
        m = min(CHUNK_ELEMS, n - start)
        idx = np.frombuffer(rng.bytes(2 * m), dtype="<u2")
        yield np.take(table, idx)


# ---------------------------------------------------------------------------------------------
# Quantised types: random blocks
# ---------------------------------------------------------------------------------------------

# Q8_0 codes: random int8 with -128 mapped to 0, so codes are symmetric in [-127, 127].
_Q8_CODES = np.where(np.arange(-128, 128) == -128, 0, np.arange(-128, 128))
_Q8_RMS = float(np.sqrt(np.mean(_Q8_CODES.astype(np.float64) ** 2)))

# Q4_0 codes: nibble n means (n - 8); nibble 0 (-8) is mapped to 8 (0): symmetric [-7, 7].
_NIB_Q4_0 = np.where(np.arange(16) == 0, 8, np.arange(16))
_Q4_0_RMS = float(np.sqrt(np.mean((_NIB_Q4_0.astype(np.float64) - 8) ** 2)))

# SWAR constants: the remaps above run on 64-bit words, 8 bytes / 16 nibbles at a time.
_U1, _U2, _U3, _U4, _U7 = (np.uint64(k) for k in (1, 2, 3, 4, 7))
_LOW_BIT_OF_NIBBLES = np.uint64(0x1111111111111111)
_LOW_BIT_OF_BYTES = np.uint64(0x0101010101010101)
_HIGH_BIT_OF_BYTES = np.uint64(0x8080808080808080)


def _q8_0_codes(w: np.ndarray) -> np.ndarray:
    """Random words -> the same bytes with every 0x80 (-128) byte set to 0."""
    y = w ^ _HIGH_BIT_OF_BYTES  # bytes that were 0x80 are now 0
    t = y | (y >> _U4)
    t |= t >> _U2
    t |= t >> _U1  # bit 0 of each byte: OR of that byte's bits
    zero = ~t & _LOW_BIT_OF_BYTES
    codes: np.ndarray = w ^ (zero << _U7)
    return codes


def _q4_0_codes(w: np.ndarray) -> np.ndarray:
    """Random words -> the same nibbles with every 0 nibble set to 8."""
    t = w | (w >> _U1) | (w >> _U2) | (w >> _U3)  # bit 0 of each nibble: OR of its bits
    zero = ~t & _LOW_BIT_OF_NIBBLES
    codes: np.ndarray = w | (zero << _U3)
    return codes


# Q4_1 / Q5_1: value = q*d + m with m = -(qmax/2)*d: uniform codes, symmetric around 0.
_Q4_1_RMS = math.sqrt((16 * 16 - 1) / 12)
_Q5_1_RMS = math.sqrt((32 * 32 - 1) / 12)

# Q5_0: value = (q - 16)*d with q in [0, 31]; q = 0 is mapped to 16 (0): symmetric [-15, 15].
_Q5_0_CODES = np.where(np.arange(32) == 0, 16, np.arange(32)) - 16
_Q5_0_RMS = float(np.sqrt(np.mean(_Q5_0_CODES.astype(np.float64) ** 2)))


# Q4_K: value = d*sc*q - dmin*m with 6-bit sub-block scales sc and mins m, q in [0, 15].
# Every sub-block gets sc = m = 32 and dmin = 7.5*d: uniform codes, symmetric around 0.
# The 12 scale bytes pack eight 6-bit pairs (ggml's get_scale_min_k4): 32 = 0b10_0000, so
# bytes 0-7 hold 32 in their low 6 bits and the high bits (0b10) of sub-blocks 4-7, and
# bytes 8-11 hold the low nibbles (0) of sub-blocks 4-7.
_Q4_K_SCALE = 32
_Q4_K_SCALES = np.array([0xA0] * 8 + [0x00] * 4, dtype=np.uint8)
_Q4_K_RMS = math.sqrt((16 * 16 - 1) / 12)

# Q6_K: value = d*sc*(q - 32), q in [0, 63] from 4 low bits (ql) and 2 high bits (qh); the
# int8 scales and the f16 d sit at the end of the block. Uniform codes have mean -0.5, so the
# sign of d alternates from block to block (the mean cancels within a row).
_Q6_K_SCALE = 16
_Q6_K_RMS = math.sqrt((64 * 64 - 1) / 12 + 0.25)

# IQ4_NL: value = d*table[nibble] with ggml's non-linear table (kvalues_iq4nl), whose mean is
# not 0: the sign of d alternates from block to block as for Q6_K.
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_IQ4_NL_RMS = float(np.sqrt(np.mean(IQ4_NL_VALUES.astype(np.float64) ** 2)))

# (header offset, alternating sign of d) per type; the header is the block's constant part.
_HEADER_AT_END = {"q6_k"}
_ALTERNATING = {"q6_k", "iq4_nl"}


def _f16_bytes(values: list[float]) -> np.ndarray:
    return np.frombuffer(np.asarray(values, dtype=np.float16).tobytes(), dtype=np.uint8)


def _q_header(gtype: GGMLType, std: float, sign: float = 1.0) -> np.ndarray:
    """The constant per-block header (scales, and mins for the _1 and K types) of a tensor."""
    if gtype.name == "q4_k":
        d = float(np.float16(std / (_Q4_K_RMS * _Q4_K_SCALE)))
        return np.concatenate([_f16_bytes([d, 7.5 * d]), _Q4_K_SCALES])
    if gtype.name == "q6_k":
        d = float(np.float16(std / (_Q6_K_RMS * _Q6_K_SCALE)))
        return np.concatenate([np.full(16, _Q6_K_SCALE, dtype=np.uint8), _f16_bytes([sign * d])])
    rms = {"q8_0": _Q8_RMS, "q4_0": _Q4_0_RMS, "q4_1": _Q4_1_RMS, "q5_0": _Q5_0_RMS, "q5_1": _Q5_1_RMS,
           "iq4_nl": _IQ4_NL_RMS}[gtype.name]
    d = float(np.float16(std / rms))
    if gtype.name == "q4_1":
        return _f16_bytes([d, -7.5 * d])
    if gtype.name == "q5_1":
        return _f16_bytes([d, -15.5 * d])
    return _f16_bytes([sign * d])


def _q_payload(rng: np.random.Generator, gtype: GGMLType, nb: int, out: np.ndarray) -> None:
    """Fill ``out`` (nb x payload bytes) with random block payloads of ``gtype``."""
    width = out.shape[1]
    raw = rng.bytes(nb * width)
    if gtype.name in ("q8_0", "q4_0"):
        words = np.frombuffer(raw, dtype="<u8")
        codes = _q8_0_codes(words) if gtype.name == "q8_0" else _q4_0_codes(words)
        out[:] = codes.view(np.uint8).reshape(nb, width)
        return
    out[:] = np.frombuffer(raw, dtype=np.uint8).reshape(nb, width)
    if gtype.name == "q5_0":
        # layout: qh (uint32, bit j = high bit of element j), then 16 bytes of nibbles
        # (low nibble: element j, high nibble: element j + 16). q = 0 iff nibble and high bit
        # are 0: setting the high bit of every zero nibble maps q = 0 to q = 16.
        qs = out[:, 4:]
        zero = np.concatenate([(qs & 0x0F) == 0, (qs >> 4) == 0], axis=1)
        out[:, :4] |= np.packbits(zero, axis=1, bitorder="little")
    # q4_1, q5_1, q4_k: uniform codes are already symmetric around the min offset;
    # q6_k, iq4_nl: their d alternates in sign (the header)


def _iter_quant(spec: TensorSpec, gtype: GGMLType, seed: int) -> Iterator[np.ndarray]:
    std = target_std(spec)
    if std == 0.0:
        raise ValueError(f"{spec.name}: kind {spec.kind} is never quantised")
    header = _q_header(gtype, std)
    flipped = _q_header(gtype, std, -1.0) if gtype.name in _ALTERNATING else None
    hlen = header.size
    head = slice(gtype.type_size - hlen, None) if gtype.name in _HEADER_AT_END else slice(0, hlen)
    payload = slice(0, gtype.type_size - hlen) if gtype.name in _HEADER_AT_END else slice(hlen, None)
    rng = tensor_rng(seed, spec.name)
    n_blocks = spec.numel // gtype.block_size
    step = CHUNK_ELEMS // gtype.block_size   # even: the sign pattern does not depend on the cut
    for start in range(0, n_blocks, step):
        nb = min(step, n_blocks - start)
        blocks = np.empty((nb, gtype.type_size), dtype=np.uint8)
        blocks[:, head] = header
        if flipped is not None:
            blocks[1::2, head] = flipped
        _q_payload(rng, gtype, nb, blocks[:, payload])
        yield blocks


def iter_tensor_bytes(spec: TensorSpec, gtype: GGMLType, seed: int) -> Iterator[np.ndarray]:
    """Yield the stored bytes of ``spec`` in ``gtype`` as a sequence of C-contiguous arrays.

    Peak memory is a few times ``CHUNK_ELEMS`` * 4 bytes (~50 MB) whatever the tensor size.
    """
    if gtype.quantized:
        if spec.numel % gtype.block_size or spec.row_width % gtype.block_size:
            raise ValueError(f"{spec.name}: width {spec.row_width} is not a multiple of the {gtype.name} block")
        return _iter_quant(spec, gtype, seed)
    return _iter_float(spec, gtype, seed)


# ---------------------------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------------------------


def dequantize(data: bytes | np.ndarray, gtype: GGMLType) -> np.ndarray:
    """Decode the stored bytes of a tensor of ``gtype`` to a flat float32 array."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(data, dtype=np.uint8)
    else:
        raw = data.view(np.uint8).ravel()
    out: np.ndarray   # numpy's stubs type some of these results Any (for Python 3.10)
    if gtype.name == "f32":
        out = raw.view(np.float32).copy()
        return out
    if gtype.name == "f16":
        return raw.view(np.float16).astype(np.float32)
    if gtype.name == "bf16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(-1, gtype.type_size)
    if gtype.name in ("q4_k", "q6_k"):
        return _dequantize_k(blocks, gtype.name)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    if gtype.name == "iq4_nl":
        qs = blocks[:, 2:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        out = (IQ4_NL_VALUES[codes].astype(np.float32) * d).ravel()
        return out
    if gtype.name == "q8_0":
        out = (blocks[:, 2:].view(np.int8).astype(np.float32) * d).ravel()
        return out
    if gtype.name in ("q4_0", "q4_1"):
        qs = blocks[:, 2:] if gtype.name == "q4_0" else blocks[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        if gtype.name == "q4_0":
            out = ((q - 8) * d).ravel()
            return out
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        out = (q * d + m).ravel()
        return out
    if gtype.name in ("q5_0", "q5_1"):
        off = 2 if gtype.name == "q5_0" else 4
        qh = np.unpackbits(blocks[:, off:off + 4], axis=1, bitorder="little")
        qs = blocks[:, off + 4:]
        q = (np.concatenate([qs & 0x0F, qs >> 4], axis=1) | (qh << 4)).astype(np.float32)
        if gtype.name == "q5_0":
            out = ((q - 16) * d).ravel()
            return out
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        out = (q * d + m).ravel()
        return out
    raise ValueError(f"cannot decode {gtype.name}")


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for all 8 sub-blocks: (nb, 12) bytes -> (nb, 8) scales and mins."""
    sc = np.empty((scales.shape[0], 8), dtype=np.float32)
    mn = np.empty_like(sc)
    sc[:, :4] = scales[:, 0:4] & 63
    mn[:, :4] = scales[:, 4:8] & 63
    sc[:, 4:] = (scales[:, 8:12] & 0x0F) | ((scales[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (scales[:, 8:12] >> 4) | ((scales[:, 4:8] >> 6) << 4)
    return sc, mn


def _dequantize_k(blocks: np.ndarray, name: str) -> np.ndarray:
    """Q4_K / Q6_K blocks (nb, type_size) -> flat float32, in ggml's element order."""
    nb = blocks.shape[0]
    if name == "q4_k":
        dm = blocks[:, 0:4].copy().view(np.float16).astype(np.float32)   # (nb, 2): d, dmin
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        qs = blocks[:, 16:].reshape(nb, 4, 32)           # 4 groups of 64 elements
        q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32).astype(np.float32)
        y4: np.ndarray = dm[:, :1, None] * sc[:, :, None] * q - dm[:, 1:, None] * mn[:, :, None]
        return y4.reshape(-1).astype(np.float32)
    ql = blocks[:, 0:128].reshape(nb, 2, 64)
    qh = blocks[:, 128:192].reshape(nb, 2, 32)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32).reshape(nb, 2, 8)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)     # (nb, 1)
    lo, hi = ql[:, :, :32], ql[:, :, 32:]
    q = np.stack([(lo & 0x0F) | (((qh >> 0) & 3) << 4), (hi & 0x0F) | (((qh >> 2) & 3) << 4),
                  (lo >> 4) | (((qh >> 4) & 3) << 4), (hi >> 4) | (((qh >> 6) & 3) << 4)],
                 axis=2).astype(np.float32) - 32    # (nb, half, 4 quarters, 32)
    scale = sc.reshape(nb, 2, 4, 2).repeat(16, axis=3)    # sc[is + 2k] for l < 16, sc[is + 2k + 1] after
    y6: np.ndarray = d[:, :, None, None] * scale * q
    return y6.reshape(-1).astype(np.float32)
