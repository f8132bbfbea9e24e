import re
from pathlib import Path

import pytest

import sdcpp_py
from sdcpp_py._ffi import ffi, lib


def test_versions_match_the_pin():
    info = sdcpp_py.system_info()
    assert info["sdcpp_py"] == sdcpp_py.__version__
    assert info["engine_commit"] == sdcpp_py.ENGINE_COMMIT == "90e87bc"
    assert info["engine_version"] == sdcpp_py.ENGINE_VERSION
    assert Path(info["library"]).is_file()


def test_enumerations_come_from_the_library():
    assert sdcpp_py.SAMPLERS[0] == "euler" and "dpm++2m" in sdcpp_py.SAMPLERS
    assert "simple" in sdcpp_py.SCHEDULERS
    assert {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_K"} <= set(sdcpp_py.WEIGHT_TYPES)
    assert all(" " not in t for t in sdcpp_py.WEIGHT_TYPES)


def _c_functions(text: str) -> set:
    return set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*\(", re.sub(r"\(\*\w+\)", "", text)))


def test_declarations_cover_the_pinned_header():
    header = Path(__file__).resolve().parents[1] / "vendor/stable-diffusion.cpp/include/stable-diffusion.h"
    if not header.is_file():
        pytest.skip("the pinned source is not materialised next to the tests")
    text = header.read_text()
    api = set(re.findall(r"^SD_API\s+[^;(]*?\b(\w+)\s*\(", text, re.M))
    assert len(api) > 40
    for name in api:
        assert hasattr(lib, name), f"{name} is declared upstream but missing from _decl"
    for struct in re.findall(r"\}\s*(sd_\w+_t);", text):
        fields = re.search(r"typedef struct \{([^}]*)\}\s*" + struct + ";", text)
        if fields is None:
            continue
        names = re.findall(r"(\w+)(?:\[\d+\])?;", fields.group(1))
        declared = [f[0] for f in ffi.typeof(struct).fields]
        assert declared == names, struct
