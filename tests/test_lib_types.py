"""``_lib_types.Lib`` (what mypy believes of ``lib``) matches the C declarations cffi parsed."""

import inspect
import typing

from sdcpp_py import _lib_types as T
from sdcpp_py._ffi import ffi, lib

# pointer types that have a class of their own in _lib_types
OPAQUE = {"sd_ctx_t *": T.SdCtx, "upscaler_ctx_t *": T.UpscalerCtx, "sdcpp_result_t *": T.ShimResult,
          "sdcpp_tokenizer_t *": T.Tokenizer,
          "struct ggml_backend_reg *": T.BackendReg, "struct ggml_backend_device *": T.BackendDev}
RESULTS = {"char *": T.CharP, "void *": T.VoidP, "sd_image_t *": T.ImageP, **OPAQUE}
FLOATS = {"float", "double"}


def _functions() -> dict[str, typing.Any]:
    out = {}
    for name in dir(lib):
        obj = getattr(lib, name)
        if not isinstance(obj, int):
            out[name] = ffi.typeof(obj)
    return out


def _scalar(ctype) -> type | None:
    if ctype.kind == "enum":
        return int
    if ctype.kind == "primitive":
        return bool if ctype.cname == "_Bool" else float if ctype.cname in FLOATS else int
    return None


def _expected_result(ctype) -> object:
    if ctype.kind == "void":
        return type(None)
    if ctype.kind == "struct":
        return {"sd_image_t": T.SdImage}[ctype.cname]
    return _scalar(ctype) or RESULTS[ctype.cname]


def _allowed_args(ctype) -> tuple[object, ...]:
    scalar = _scalar(ctype)
    if scalar is not None:
        return (scalar,)
    if ctype.cname in OPAQUE:
        return (OPAQUE[ctype.cname],)
    if ctype.cname == "char *":
        return (T.CStr, T.CData)
    return (T.CData,)


def test_every_native_function_is_typed_alike():
    functions = _functions()
    assert len(functions) > 60
    for name, ctype in functions.items():
        method = getattr(T.Lib, name, None)
        assert method is not None, f"{name} is declared in C but missing from _lib_types.Lib"
        hints = typing.get_type_hints(method, vars(T))
        params = [p for p in inspect.signature(method).parameters.values() if p.name != "self"]
        assert all(p.kind is inspect.Parameter.POSITIONAL_ONLY for p in params), name
        assert len(params) == len(ctype.args), f"{name}: {len(params)} arguments, C has {len(ctype.args)}"
        for p, arg in zip(params, ctype.args, strict=True):
            assert hints[p.name] in _allowed_args(arg), f"{name}({p.name}): {hints[p.name]} for C {arg.cname}"
        assert hints["return"] is _expected_result(ctype.result) or (
            hints["return"] is None and ctype.result.kind == "void"), f"{name} returns C {ctype.result.cname}"


def test_every_typed_member_exists():
    for name in dir(T.Lib):
        if name.startswith("_"):
            continue
        assert hasattr(lib, name), f"_lib_types.Lib.{name} is not in the library's declarations"
    for name in typing.get_type_hints(T.Lib):
        assert isinstance(getattr(lib, name), int), name


def test_name_lists_are_the_librarys():
    """settings.py spells the engine's names as literals (it imports without the library): the same
    names, in the engine's order."""
    from sdcpp_py import settings
    from sdcpp_py._ffi import string

    def names(count, fn):
        return tuple(string(fn(i)) for i in range(count))

    assert settings.SAMPLERS == names(lib.SAMPLE_METHOD_COUNT, lib.sd_sample_method_name)
    assert settings.SCHEDULERS == names(lib.SCHEDULER_COUNT, lib.sd_scheduler_name)
    assert settings.RNG_TYPES == names(lib.RNG_TYPE_COUNT, lib.sd_rng_type_name)
    engine_types = names(lib.SD_TYPE_COUNT, lib.sd_type_name)
    assert settings.WEIGHT_TYPES == tuple(n for n in engine_types if n in settings.WEIGHT_TYPES)
    assert len(settings.WEIGHT_TYPES) == 13


def test_hires_upscaler_names_are_the_librarys():
    from sdcpp_py import settings
    from sdcpp_py._ffi import string

    names = tuple(string(lib.sd_hires_upscaler_name(i)) for i in range(lib.SD_HIRES_UPSCALER_COUNT))
    assert settings.HIRES_UPSCALERS == names
