"""Which models a pipeline holds in memory: releasing and reloading the text encoder
and the diffusion model, and one text encoder shared by several pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Set

from ._ffi import ffi, lib
from .errors import IncompatibleModelError, InvalidArgumentError, ModelLoadError
from .staged import check

if TYPE_CHECKING:
    from .pipeline import Pipeline

ENCODER, DIFFUSION = 0, 1                     # the shim's component ids
COMPONENT_FILE = {ENCODER: "llm", DIFFUSION: "diffusion_model"}
COMPONENT_NAME = {ENCODER: "text encoder", DIFFUSION: "diffusion model"}
# settings that decide where and in which form a text encoder lives: pipelines
# sharing one must agree on them (an encoder in Vulkan memory cannot run on the CPU)
_SHARED_SETTINGS = ("wtype", "keep_clip_on_cpu", "offload_params_to_cpu", "enable_mmap")


def file_stamp(path: Optional[Path]) -> Optional[tuple]:
    """What tells a file apart from a replaced one: size and modification time."""
    if path is None:
        return None
    st = path.stat()
    return (st.st_size, st.st_mtime_ns)


class ContextHandle:
    """Owns one native context and knows the contexts it shares a text encoder with.

    Freed once, by ``Pipeline.close()`` or by the pipeline's finalizer: a shared
    encoder runs on its loader's backend, so before that context goes the encoder is
    moved onto a context of the group that stays. Holds no reference to a pipeline.
    """

    def __init__(self, ptr) -> None:
        self.ptr = ptr
        self.group: Set["ContextHandle"] = {self}

    def join(self, other: "ContextHandle") -> None:
        """Become a member of ``other``'s encoder-sharing group."""
        other.group.add(self)
        self.group = other.group

    @property
    def sharing(self) -> bool:
        return sum(c.ptr is not None for c in self.group) > 1

    def free(self) -> None:
        ptr = self.ptr
        if ptr is None:
            return
        survivors = [c for c in self.group if c is not self and c.ptr is not None]
        if survivors:   # a failed move leaves this handle as it was: nothing freed, nothing leaked
            check(lib.sdcpp_rebind_encoder(survivors[0].ptr))
        self.ptr = None
        self.group.discard(self)
        self.group = {self}
        lib.sdcpp_free_ctx(ptr)


class Residency:
    """Mixin of Pipeline: component residency and encoder sharing."""

    _handle: Optional[ContextHandle]
    _stamps: Dict[int, Optional[tuple]]

    @property
    def encoder_loaded(self) -> bool:
        return bool(self._query(lib.sdcpp_component_loaded, ENCODER))

    @property
    def diffusion_loaded(self) -> bool:
        return bool(self._query(lib.sdcpp_component_loaded, DIFFUSION))

    @property
    def weight_bytes(self) -> Dict[str, int]:
        """Bytes of weights resident now, per component (0 while released)."""
        return {"encoder": int(self._query(lib.sdcpp_component_bytes, ENCODER)),
                "diffusion": int(self._query(lib.sdcpp_component_bytes, DIFFUSION))}

    def release_encoder(self) -> None:
        """Free the text encoder's weights (reloaded from its file when next needed)."""
        self._release(ENCODER)

    def release_diffusion_model(self) -> None:
        """Free the diffusion model's weights (reloaded from its file when next needed)."""
        self._release(DIFFUSION)

    def _release(self, component: int) -> None:
        if self.paths[COMPONENT_FILE[component]] is None:
            raise InvalidArgumentError(f"the {COMPONENT_NAME[component]} can be released only when it comes "
                                       f"from a file of its own ({COMPONENT_FILE[component]}=...)")
        if self._query(lib.sdcpp_component_loaded, component):
            self._native(lib.sdcpp_component_release, component, error=ModelLoadError)

    def _ensure(self, component: int) -> None:
        if self._query(lib.sdcpp_component_loaded, component):
            return
        path = self.paths[COMPONENT_FILE[component]]
        if path is None or not path.is_file():
            raise ModelLoadError(f"cannot reload the {COMPONENT_NAME[component]}: {path} is gone")
        if file_stamp(path) != self._stamps.get(component):
            raise ModelLoadError(f"cannot reload the {COMPONENT_NAME[component]}: {path} changed since the "
                                 "pipeline was created (make a new Pipeline for the new file)")
        self._native(lib.sdcpp_component_reload, component, ffi.new("char[]", str(path).encode()),
                     error=ModelLoadError)

    def _ensure_encoder(self) -> None:
        if self.settings.release_diffusion:
            self._release(DIFFUSION)
        self._ensure(ENCODER)

    def _after_encoding(self) -> None:
        if self.settings.release_encoder:
            self._release(ENCODER)

    def _load_sharing_encoder(self, other: "Pipeline") -> None:
        """Load everything but the text encoder, then borrow ``other``'s (one copy in memory,
        loaded once)."""
        if not isinstance(other, Residency):
            raise TypeError(f"share_encoder_with must be a Pipeline, not {type(other).__name__}")
        other._require_open()
        if other.encoder_id != self.encoder_id or self.paths["llm"] is None:
            raise IncompatibleModelError("only pipelines loading the same text encoder file (llm=...) can share it")
        if self.components.llm_hidden is None or other.components.llm_hidden is None:
            raise IncompatibleModelError("encoder sharing needs LLM-conditioned models (Z-Image, FLUX.2)")
        differ = [n for n in _SHARED_SETTINGS if getattr(self.settings, n) != getattr(other.settings, n)]
        self._resolve_device()
        if self.device != other.device:
            differ.append("device")
        if differ:
            raise IncompatibleModelError(f"pipelines sharing a text encoder need the same {', '.join(differ)}")
        self._load(defer_encoder=True)
        other._native(lib.sdcpp_share_encoder, self._require_open(), error=ModelLoadError)  # other's to self
        self._handle.join(other._handle)

    @property
    def shares_encoder(self) -> bool:
        return self._handle is not None and self._handle.sharing
