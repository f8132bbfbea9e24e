"""Values across the FFI: numpy arrays as ``sdcpp_tensor_t`` views, the shim's results
copied back into numpy, and the shim's error codes as exceptions."""

from __future__ import annotations

import numpy as np

from ._ffi import ffi, lib, string
from ._lib_types import CStruct, ShimResult
from .errors import Cancelled, InvalidArgumentError, SdcppError

PartKey = tuple[int, str, int]  # (role: 0 positive / 1 negative, part name, index)


class TensorViews:
    """``sdcpp_tensor_t`` views over numpy arrays, alive as long as this object."""

    def __init__(self, items: list[tuple[PartKey, np.ndarray]]) -> None:
        self.arrays: list[np.ndarray] = []
        self.names: list[CStruct] = []
        self.views = ffi.new("sdcpp_tensor_t[]", max(len(items), 1))
        self.count = len(items)
        for i, ((role, part, index), array) in enumerate(items):
            is_int = array.dtype.kind in "iu"
            a = np.ascontiguousarray(array, dtype=np.int32 if is_int else np.float32)
            if not 1 <= a.ndim <= 5:
                raise InvalidArgumentError(f"{part}: arrays of 1 to 5 dimensions expected, got {a.ndim}")
            name = ffi.new("char[]", part.encode())
            v = self.views[i]
            v.role, v.part, v.index, v.is_int32, v.ndim = role, name, index, int(is_int), a.ndim
            for d, n in enumerate(reversed(a.shape)):
                v.ne[d] = n
            v.data = ffi.from_buffer(a)
            self.arrays.append(a)
            self.names.append(name)

    @property
    def first(self) -> CStruct:
        """The ``sdcpp_tensor_t*`` of the first view (NULL when there is none)."""
        return self.views if self.count else ffi.NULL


def read_result(result: ShimResult) -> list[tuple[PartKey, np.ndarray]]:
    """Copy every tensor of an ``sdcpp_result_t*`` into numpy, then free it."""
    try:
        out: list[tuple[PartKey, np.ndarray]] = []
        view = ffi.new("sdcpp_tensor_t*")
        for i in range(lib.sdcpp_result_count(result)):
            if lib.sdcpp_result_get(result, i, view) != 0:
                raise SdcppError(string(lib.sdcpp_last_error()))
            shape = tuple(reversed([view.ne[d] for d in range(view.ndim)]))
            dtype = np.int32 if view.is_int32 else np.float32
            count = int(np.prod(shape))
            a = np.frombuffer(ffi.buffer(view.data, count * 4), dtype=dtype).reshape(shape).copy()
            out.append(((view.role, ffi.string(view.part).decode(), view.index), a))
        return out
    finally:
        lib.sdcpp_result_free(result)


def check(rc: int, error_type: type[SdcppError] = SdcppError) -> None:
    """Raise the shim's per-thread message when a call failed."""
    if rc != 0:
        message = string(lib.sdcpp_last_error()) or "native call failed"
        raise {-2: InvalidArgumentError, -3: Cancelled}.get(rc, error_type)(message)
