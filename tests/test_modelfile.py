"""The GGUF header reader: metadata arrays (kept when short, skipped when long) and truncation."""

import struct

import pytest

from sdcpp_py import CorruptModelError
from sdcpp_py.modelfile import inspect


def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _gguf(tokens: list[bytes]) -> tuple[bytes, int]:
    """A GGUF with a long string array, a long int32 array, a short array and one F32 tensor;
    returns the file and the length of its header before the padding."""
    kv = (_str(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, len(tokens)) + b"".join(map(_str, tokens))
          + _str(b"tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 5, len(tokens))
          + struct.pack(f"<{len(tokens)}i", *range(len(tokens)))
          + _str(b"short") + struct.pack("<IIQ", 9, 4, 3) + struct.pack("<3I", 7, 8, 9)
          + _str(b"general.name") + struct.pack("<I", 8) + _str("tiny ✓".encode()))
    tensor = _str(b"w") + struct.pack("<IQQ", 2, 4, 2) + struct.pack("<IQ", 0, 0)   # F32, ne = (4, 2)
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 4) + kv + tensor
    return header + b"\0" * (-len(header) % 32) + struct.pack("<8f", *range(8)), len(header)


def test_long_arrays_are_skipped_short_ones_kept(tmp_path):
    data, _ = _gguf([b"tok%d" % i for i in range(1000)] + [b"\xff not utf-8"])
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    f = inspect(path)
    assert f.metadata["tokenizer.ggml.tokens"] == "<array of 1001>"
    assert f.metadata["tokenizer.ggml.token_type"] == "<array of 1001>"
    assert f.metadata["short"] == [7, 8, 9]
    assert f.metadata["general.name"] == "tiny ✓"
    assert f.tensors["w"].shape == (2, 4) and f.tensors["w"].dtype == "F32"


def test_a_header_cut_anywhere_is_corrupt(tmp_path):
    data, header_len = _gguf([b"t%d" % i for i in range(200)])
    path = tmp_path / "cut.gguf"
    for n in sorted({*range(0, 64), *range(64, header_len + 32, 97), header_len - 1, header_len + 1,
                     len(data) - 1}):
        path.write_bytes(data[:n])
        with pytest.raises(CorruptModelError, match="truncated|past the end|neither"):
            inspect(path)


def test_implausible_string_length_in_a_long_array(tmp_path):
    data, _ = _gguf([b"x"] * 100)
    first = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 16
    bad = data[:first] + struct.pack("<Q", 1 << 40) + data[first + 8:]
    path = tmp_path / "bad.gguf"
    path.write_bytes(bad)
    with pytest.raises(CorruptModelError, match="implausible string length"):
        inspect(path)
