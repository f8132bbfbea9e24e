"""Synthetic model writer: layouts, GGUF/safetensors containers, reproducibility, API checks.

Nothing here needs a model hub: the files are parsed back with a small reader written in this
test and with sdcpp_py.modelfile; one test has the engine decode the quantized blocks we write.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from sdcpp_py.synthetic import (
    COMPONENTS,
    FAMILIES,
    SyntheticModelSet,
    component_filename,
    component_layout,
    component_specs,
    total_params,
    write_component,
    write_model_set,
)
from sdcpp_py.synthetic.__main__ import main as cli_main
from sdcpp_py.synthetic.dtypes import GGML_TYPES, storage_type
from sdcpp_py.synthetic.layouts import (
    Qwen3Config,
    TensorSpec,
    VAEConfig,
    ZImageDiTConfig,
    flux2_vae,
    qwen3_llm,
    z_image_dit,
    zimage_ffn_width,
)
from sdcpp_py.synthetic.tensordata import FLUX2_BN_EPS, FLUX2_BN_MEAN, FLUX2_BN_STD, dequantize, iter_tensor_bytes

TYPES_BY_ID = {t.ggml_id: t for t in GGML_TYPES.values()}


# ---------------------------------------------------------------------------------------------
# A minimal independent reader
# ---------------------------------------------------------------------------------------------


def read_gguf(path: Path) -> dict:
    """Parse a GGUF v3 file: metadata, tensor infos and the data section's start."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    def string() -> str:
        nonlocal pos
        n = take("Q")
        s = data[pos:pos + n].decode()
        pos += n
        return s

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    assert data[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    assert version == 3
    meta = {}
    for _ in range(n_kv):
        key = string()
        vtype = take("I")
        meta[key] = string() if vtype == 8 else take(scalar[vtype])
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        n_dims = take("I")
        ne = tuple(take("Q") for _ in range(n_dims))
        tensors[name] = {"ne": ne, "type": TYPES_BY_ID[take("I")], "offset": take("Q")}
    alignment = meta.get("general.alignment", 32)
    start = pos + (-pos % alignment)
    return {"meta": meta, "tensors": tensors, "data_start": start, "alignment": alignment, "raw": data}


def gguf_tensor(f: dict, name: str) -> np.ndarray:
    info = f["tensors"][name]
    numel = math.prod(info["ne"])
    start = f["data_start"] + info["offset"]
    return dequantize(f["raw"][start:start + info["type"].nbytes(numel)], info["type"])


def read_safetensors(path: Path) -> tuple[dict, int, bytes]:
    raw = path.read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    return json.loads(raw[8:8 + n]), 8 + n, raw


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

# (family, component, llm names, tensors, params in millions rounded to 0.01)
FULL_LAYOUTS = [
    ("z-image-turbo", "dit", "gguf", 453, 6154.91),
    ("flux2-klein", "dit", "gguf", 149, 3875.54),
    ("flux2-klein", "llm", "gguf", 398, 4022.47),
    ("flux2-klein", "llm", "hf", 398, 4022.47),
    ("z-image-turbo", "vae", "gguf", 244, 83.82),
    ("flux2-klein", "vae", "gguf", 251, 84.05),
]


@pytest.mark.parametrize("family, component, names, n_tensors, mparams", FULL_LAYOUTS)
def test_full_layout_counts(family, component, names, n_tensors, mparams):
    specs = component_layout(family, component, "full", llm_names=names)
    assert len(specs) == n_tensors
    assert round(total_params(specs) / 1e6, 2) == mparams
    assert len({s.name for s in specs}) == len(specs)


def test_full_layout_details():
    z = {s.name: s for s in component_layout("z-image-turbo", "dit", "full")}
    assert z["layers.29.feed_forward.w1.weight"].shape == (10240, 3840)
    assert z["layers.0.attention.qkv.weight"].shape == (11520, 3840)
    assert z["t_embedder.mlp.0.weight"].kind == "f32w"
    assert z["cap_embedder.1.weight"].shape == (3840, 2560)
    assert "context_refiner.1.adaLN_modulation.0.weight" not in z
    k = {s.name: s for s in component_layout("flux2-klein", "dit", "full")}
    assert k["txt_in.weight"].shape == (3072, 7680)
    assert k["single_blocks.19.linear1.weight"].shape == (27648, 3072)
    assert "single_blocks.20.linear1.weight" not in k and "double_blocks.4.img_mlp.0.weight" in k
    q = {s.name: s for s in component_layout("flux2-klein", "llm", "full")}
    assert q["token_embd.weight"].shape == (151936, 2560) and q["token_embd.weight"].kind == "emb"
    assert q["blk.35.attn_k.weight"].shape == (1024, 2560)
    v = {s.name: s for s in component_layout("flux2-klein", "vae", "full")}
    assert v["decoder.conv_in.weight"].shape == (512, 32, 3, 3)
    assert v["bn.num_batches_tracked"].shape == ()


def test_tiny_layouts_are_consistent():
    z = {s.name: s for s in component_layout("z-image-turbo", "dit", "tiny")}
    llm = {s.name: s for s in component_layout("z-image-turbo", "llm", "tiny")}
    hidden = llm["token_embd.weight"].shape[1]
    assert hidden == 64 and llm["token_embd.weight"].shape[0] == 151936
    assert z["cap_embedder.1.weight"].shape == (256, hidden)  # caption width = LLM hidden
    assert z["layers.0.feed_forward.w1.weight"].shape == (768, 256)
    assert z["layers.0.adaLN_modulation.0.weight"].shape == (1024, 256)
    k = {s.name: s for s in component_layout("flux2-klein", "dit", "tiny")}
    assert k["txt_in.weight"].shape == (128, hidden)
    vae = {s.name: s for s in component_layout("flux2-klein", "vae", "tiny")}
    assert vae["decoder.conv_in.weight"].shape == (128, 32, 3, 3)  # 4 x decoder width 32
    assert vae["encoder.conv_in.weight"].shape == (128, 3, 3, 3)  # encoder width fixed


def test_zimage_ffn_width_matches_engine_rounding():
    # int(8/3 (float32) * dim) rounded up to a multiple of 256, as z_image.hpp's FeedForward
    assert zimage_ffn_width(3840) == 10240
    assert zimage_ffn_width(256) == 768
    assert zimage_ffn_width(512) == 1536


def test_layout_validation():
    with pytest.raises(ValueError):
        z_image_dit(ZImageDiTConfig(hidden=128))  # adaLN input must be 256
    with pytest.raises(ValueError):
        z_image_dit(ZImageDiTConfig(hidden=300))  # not a multiple of head_dim
    with pytest.raises(ValueError):
        qwen3_llm(Qwen3Config(layers=28))  # read as Qwen3-2B by the engine
    with pytest.raises(ValueError):
        qwen3_llm(Qwen3Config(vocab=1000))
    with pytest.raises(ValueError):
        flux2_vae(VAEConfig(decoder_ch=48))


def test_storage_types():
    specs = {s.name: s for s in component_layout("z-image-turbo", "dit", "tiny")}
    q8 = lambda n: storage_type(specs[n], "q8_0").name  # noqa: E731
    assert q8("layers.0.attention.qkv.weight") == "q8_0"
    assert q8("t_embedder.mlp.0.weight") == "f32"  # forced f32 in the engine
    assert q8("layers.0.attention_norm1.weight") == "f32"
    assert q8("x_pad_token") == "f32"
    vae = {s.name: s for s in component_layout("flux2-klein", "vae", "tiny")}
    assert storage_type(vae["decoder.conv_in.weight"], "f32").name == "f16"  # convs are f16
    from sdcpp_py.synthetic.layouts import TensorSpec
    assert storage_type(TensorSpec("x", (64, 48), "w"), "q4_0").name == "f16"  # 48 % 32 != 0


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_set_gguf(tmp_path, family):
    ms = write_model_set(family, tmp_path, size="tiny", seed=3, dit_type="q8_0")
    assert isinstance(ms, SyntheticModelSet) and ms.family == family and ms.size == "tiny"
    assert ms.diffusion_model.name == f"{family}-tiny-dit-q8_0-s3.gguf"
    assert ms.llm.name == "qwen3-tiny-llm-f16-s3.gguf"
    for component, path in (("dit", ms.diffusion_model), ("llm", ms.llm), ("vae", ms.vae)):
        f = read_gguf(path)
        specs = component_specs(family, component, size="tiny", fmt="gguf")
        assert list(f["tensors"]) == [s.name for s in specs]
        assert f["meta"]["general.architecture"]
        assert f["meta"]["general.alignment"] == 32
        wtype = "q8_0" if component == "dit" else "f16"
        end = 0
        for s in specs:
            info = f["tensors"][s.name]
            assert info["ne"] == (s.ne or (1,))
            assert info["type"] == storage_type(s, wtype)
            assert info["offset"] % 32 == 0 and info["offset"] >= end
            end = info["offset"] + info["type"].nbytes(s.numel)
        assert path.stat().st_size == f["data_start"] + end + (-end % 32)
        # values: norms 1, biases 0, weights N(0, 1/fan_in)
        for s in specs:
            if s.kind in ("norm", "bias") and s.numel > 1:
                assert np.all(gguf_tensor(f, s.name) == (1.0 if s.kind == "norm" else 0.0)), s.name
            if s.kind in ("w", "conv") and s.numel >= 16384:
                v = gguf_tensor(f, s.name)
                assert abs(v.std() * math.sqrt(s.fan_in) - 1) < 0.05, s.name
                assert abs(v.mean()) * math.sqrt(s.fan_in) < 0.05, s.name


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_set_safetensors(tmp_path, family):
    ms = write_model_set(family, tmp_path, size="tiny", dit_type="bf16", fmt="safetensors")
    for component, path in (("dit", ms.diffusion_model), ("llm", ms.llm), ("vae", ms.vae)):
        assert path.suffix == ".safetensors"
        header, start, raw = read_safetensors(path)
        assert (start - 8) % 8 == 0
        meta = header.pop("__metadata__")
        assert meta["sdcpp_py.synthetic.seed"] == "0"
        specs = component_specs(family, component, size="tiny", fmt="safetensors")
        assert list(header) == [s.name for s in specs]
        offset = 0
        for s in specs:
            h = header[s.name]
            assert tuple(h["shape"]) == s.shape
            assert h["data_offsets"][0] == offset
            offset = h["data_offsets"][1]
        assert len(raw) == start + offset
        if component == "llm":
            assert "model.embed_tokens.weight" in header  # HF names in safetensors
        if component == "dit":
            w = next(s for s in specs if s.kind == "w")
            assert header[w.name]["dtype"] == "BF16"


def test_flux2_vae_batch_norm_statistics(tmp_path):
    path = write_component("flux2-klein", "vae", tmp_path, fmt="safetensors", wtype="f32")
    header, start, raw = read_safetensors(path)

    def tensor(name):
        b, e = header[name]["data_offsets"]
        assert header[name]["dtype"] == "F32"
        return np.frombuffer(raw[start + b:start + e], dtype="<f4")

    assert np.allclose(tensor("bn.running_mean"), FLUX2_BN_MEAN)
    assert np.allclose(np.sqrt(tensor("bn.running_var") + FLUX2_BN_EPS), FLUX2_BN_STD, atol=1e-6)


@pytest.mark.parametrize("wtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quantized_sizes_and_values(tmp_path, wtype):
    path = write_component("flux2-klein", "dit", tmp_path, wtype=wtype)
    f = read_gguf(path)
    t = GGML_TYPES[wtype]
    infos = list(f["tensors"].items())
    n_quant = 0
    for i, (name, info) in enumerate(infos):
        numel = math.prod(info["ne"])
        nbytes = info["type"].nbytes(numel)
        if info["type"] is t:
            n_quant += 1
            assert nbytes == numel // 32 * t.type_size
        next_offset = infos[i + 1][1]["offset"] if i + 1 < len(infos) else path.stat().st_size - f["data_start"]
        assert next_offset - info["offset"] == nbytes + (-nbytes % 32), name
    assert n_quant == 19  # every Linear of the tiny Klein DiT
    v = gguf_tensor(f, "double_blocks.0.img_mlp.0.weight")  # 768 x 128
    assert abs(v.std() * math.sqrt(128) - 1) < 0.05
    assert abs(v.mean()) * math.sqrt(128) < 0.05


@pytest.mark.parametrize("wtype", ["q4_k", "q6_k", "iq4_nl"])
def test_k_and_nonlinear_quant_blocks(wtype):
    """256-element K blocks and IQ4_NL's table: N(0, 1/fan_in) values, zero-mean rows, and
    the bytes do not depend on where the chunks are cut (the sign pattern of d is global)."""
    t = GGML_TYPES[wtype]
    spec = TensorSpec("layers.0.feed_forward.w1.weight", (96, 1024), "w")
    raw = np.concatenate([b.reshape(-1) for b in iter_tensor_bytes(spec, t, 0)])
    assert raw.size == t.nbytes(spec.numel)
    v = dequantize(raw, t).reshape(96, 1024)
    assert np.isfinite(v).all()
    assert abs(v.std() * math.sqrt(1024) - 1) < 0.03
    assert np.abs(v.mean(axis=1)).max() * math.sqrt(1024) < 0.2    # each row's mean is near 0
    if wtype == "q4_k":    # a 6-bit scale/min pair packed in the 12 scale bytes decodes to 32, 32
        assert (raw.reshape(-1, 144)[:, 4:16] == [0xA0] * 8 + [0] * 4).all()
    with mock.patch("sdcpp_py.synthetic.tensordata.CHUNK_ELEMS", 1 << 13):
        cut = np.concatenate([b.reshape(-1) for b in iter_tensor_bytes(spec, t, 0)])
    assert np.array_equal(raw[: t.nbytes(1 << 13)], cut[: t.nbytes(1 << 13)])



@pytest.mark.parametrize("wtype", ["q4_0", "q4_k", "q6_k", "iq4_nl"])
def test_engine_decodes_our_blocks(tmp_path, wtype):
    """The blocks mean to ggml what they mean to our decoder: the engine's convert to F32
    gives exactly our dequantized values, tensor by tensor."""
    from sdcpp_py.convert import convert

    t = GGML_TYPES[wtype]
    src = write_component("z-image-turbo", "dit", tmp_path, wtype=wtype)
    out = convert(src, tmp_path / "f32.gguf", wtype="f32").path
    ours, theirs = read_gguf(src), read_gguf(out)
    # the engine keeps embedder weights in their file type (tensor_should_be_converted)
    converted = [n for n, info in ours["tensors"].items()
                 if info["type"] is t and theirs["tensors"][n]["type"] is GGML_TYPES["f32"]]
    assert len(converted) >= 4
    for name in converted:
        np.testing.assert_array_equal(gguf_tensor(theirs, name), gguf_tensor(ours, name), err_msg=name)


@pytest.mark.parametrize(("wtype", "target"), [("q4_0", "bf16"), ("q4_k", "f16"), ("q8_0", "bf16"), ("q6_k", "f16")])
def test_engine_expands_our_blocks(tmp_path, wtype, target):
    """The engine's expansion of quantized weights to F16/BF16 (what ``upcast`` does at load,
    a few rows at a time) writes our dequantized values rounded to nearest even, tensor by
    tensor, for tensors longer than one conversion chunk (65536 values) too."""
    from sdcpp_py.convert import convert
    from sdcpp_py.synthetic.tensordata import _encode_float

    t, wide = GGML_TYPES[wtype], GGML_TYPES[target]
    src = write_component("z-image-turbo", "dit", tmp_path, wtype=wtype)
    out = convert(src, tmp_path / f"{target}.gguf", wtype=target).path
    ours, theirs = read_gguf(src), read_gguf(out)
    converted = [n for n, info in ours["tensors"].items()
                 if info["type"] is t and theirs["tensors"][n]["type"] is wide]
    ne = [ours["tensors"][n]["ne"] for n in converted]
    # chunk boundaries are crossed, and some tensor ends in a partial chunk
    assert any(n0 * n1 > 65536 and n1 % max(1, 65536 // n0) for n0, n1, *_ in ne), ne
    for name in converted:
        want = dequantize(_encode_float(gguf_tensor(ours, name), wide), wide)
        np.testing.assert_array_equal(gguf_tensor(theirs, name), want, err_msg=name)


def test_k_quant_falls_back_for_narrow_rows():
    # the tiny layouts' 128-wide Linears cannot hold 256-element blocks: F16, as the engine would
    assert storage_type(TensorSpec("x", (64, 128), "w"), "q4_k").name == "f16"
    assert storage_type(TensorSpec("x", (64, 512), "w"), "q4_k").name == "q4_k"
    assert storage_type(TensorSpec("x", (64, 96), "w"), "iq4_nl").name == "iq4_nl"
    assert storage_type(TensorSpec("tok", (64, 512), "emb"), "q4_k").name == "f16"   # no get_rows kernel kept


def test_reproducible_bytes(tmp_path):
    a = write_component("z-image-turbo", "dit", tmp_path / "a", seed=5, wtype="q4_0")
    b = write_component("z-image-turbo", "dit", tmp_path / "b", seed=5, wtype="q4_0")
    c = write_component("z-image-turbo", "dit", tmp_path / "c", seed=6, wtype="q4_0")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert a.stat().st_size == c.stat().st_size
    d = write_component("z-image-turbo", "dit", tmp_path / "d", seed=5, wtype="f16", fmt="safetensors")
    e = write_component("z-image-turbo", "dit", tmp_path / "e", seed=5, wtype="f16", fmt="safetensors")
    assert d.read_bytes() == e.read_bytes()


def test_llm_shared_between_families(tmp_path):
    a = write_component("z-image-turbo", "llm", tmp_path)
    mtime = a.stat().st_mtime_ns
    b = write_component("flux2-klein", "llm", tmp_path)
    assert a == b and b.stat().st_mtime_ns == mtime


def test_reuse_overwrite_and_partial(tmp_path):
    p = write_component("flux2-klein", "dit", tmp_path)
    data, mtime = p.read_bytes(), p.stat().st_mtime_ns
    assert write_component("flux2-klein", "dit", tmp_path) == p
    assert p.stat().st_mtime_ns == mtime  # reused
    write_component("flux2-klein", "dit", tmp_path, overwrite=True)
    assert p.stat().st_mtime_ns != mtime and p.read_bytes() == data
    p.write_bytes(data[: len(data) // 2])  # a damaged file is not reused
    write_component("flux2-klein", "dit", tmp_path)
    assert p.read_bytes() == data
    assert not [q for q in tmp_path.iterdir() if q.name.endswith(".partial")]


def test_modelfile_reads_our_files(tmp_path):
    from sdcpp_py.modelfile import inspect

    for fmt, wtype in (("gguf", "q8_0"), ("safetensors", "f16")):
        for component in COMPONENTS:
            path = write_component("flux2-klein", component, tmp_path, fmt=fmt,
                                   wtype=wtype if component == "dit" else "f16")
            mf = inspect(path)
            specs = component_specs("flux2-klein", component, fmt=fmt)
            assert set(mf.tensors) == {s.name for s in specs}
            for s in specs:
                assert tuple(mf.tensors[s.name].shape) in (s.shape, (1,) if not s.shape else s.shape)


def test_cli(tmp_path, capsys):
    assert cli_main(["--family", "flux2-klein", "--out", str(tmp_path), "--dit-type", "Q4_0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    paths = dict(line.split("\t") for line in lines)
    assert set(paths) == {"diffusion_model", "llm", "vae"}
    assert Path(paths["diffusion_model"]).name == "flux2-klein-tiny-dit-q4_0-s0.gguf"
    assert all(Path(p).is_file() for p in paths.values())
    with pytest.raises(SystemExit):
        cli_main(["--family", "sd15", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"family": "sdxl"}, "z-image-turbo"),
    ({"size": "medium"}, "tiny"),
    ({"dit_type": "q3_k"}, "q8_0"),
    ({"llm_type": "int8"}, "f16"),
    ({"vae_type": "fp16"}, "f16"),
    ({"fmt": "ckpt"}, "safetensors"),
    ({"fmt": "safetensors", "dit_type": "q8_0"}, "bf16"),
    ({"seed": -1}, "seed"),
])
def test_invalid_arguments(tmp_path, kwargs, match):
    args = {"family": "flux2-klein", **kwargs}
    family = args.pop("family")
    with pytest.raises(ValueError, match=match):
        write_model_set(family, tmp_path, **args)
    assert not list(tmp_path.iterdir())  # nothing written


def test_invalid_component(tmp_path):
    with pytest.raises(ValueError, match="dit"):
        write_component("flux2-klein", "unet", tmp_path)
    with pytest.raises(ValueError):
        component_filename("flux2-klein", "dit", wtype="q4_0", fmt="safetensors")
