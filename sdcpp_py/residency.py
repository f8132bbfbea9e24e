"""Which models a pipeline holds in memory: releasing and reloading the text encoder
and the diffusion model, and one text encoder shared by several pipelines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

from ._ffi import ffi, lib
from .errors import IncompatibleModelError, ModelLoadError
from .staged import check

if TYPE_CHECKING:
    from .pipeline import Pipeline

ENCODER, DIFFUSION = 0, 1                     # the shim's component ids
COMPONENT_FILE = {ENCODER: "llm", DIFFUSION: "diffusion_model"}
COMPONENT_NAME = {ENCODER: "text encoder", DIFFUSION: "diffusion model"}


class Residency:
    """Mixin of Pipeline: component residency and encoder sharing."""

    _encoder_group: List["Pipeline"]

    @property
    def encoder_loaded(self) -> bool:
        return bool(lib.sdcpp_component_loaded(self._require_open(), ENCODER))

    @property
    def diffusion_loaded(self) -> bool:
        return bool(lib.sdcpp_component_loaded(self._require_open(), DIFFUSION))

    @property
    def weight_bytes(self) -> Dict[str, int]:
        """Bytes of weights resident now, per component (0 while released)."""
        ctx = self._require_open()
        return {"encoder": int(lib.sdcpp_component_bytes(ctx, ENCODER)),
                "diffusion": int(lib.sdcpp_component_bytes(ctx, DIFFUSION))}

    def release_encoder(self) -> None:
        """Free the text encoder's weights (reloaded from its file when next needed)."""
        self._release(ENCODER)

    def release_diffusion_model(self) -> None:
        """Free the diffusion model's weights (reloaded from its file when next needed)."""
        self._release(DIFFUSION)

    def _release(self, component: int) -> None:
        if lib.sdcpp_component_loaded(self._require_open(), component):
            self._native(lib.sdcpp_component_release, component, error=ModelLoadError)

    def _ensure(self, component: int) -> None:
        if lib.sdcpp_component_loaded(self._require_open(), component):
            return
        path = self.paths[COMPONENT_FILE[component]]
        if path is None or not path.is_file():
            raise ModelLoadError(f"cannot reload the {COMPONENT_NAME[component]}: {path} is gone")
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
        """Load, then give this context's text encoder to ``other``'s group (one copy in memory).

        The group's encoder is released before this context loads its own, so two
        copies never coexist."""
        if not isinstance(other, Residency):
            raise TypeError(f"share_encoder_with must be a Pipeline, not {type(other).__name__}")
        other._require_open()
        if other.encoder_id != self.encoder_id or other.settings.wtype != self.settings.wtype:
            raise IncompatibleModelError("only pipelines loading the same text encoder file (and weight type) "
                                         "can share it")
        if self.components.llm_hidden is None or other.components.llm_hidden is None:
            raise IncompatibleModelError("encoder sharing needs LLM-conditioned models (Z-Image, FLUX.2)")
        other.release_encoder()
        self._load()
        group = [p for p in other._encoder_group if not p.closed]
        for peer in group:
            self._native(lib.sdcpp_share_encoder, peer._require_open(), error=ModelLoadError)
        group.append(self)
        for member in group:
            member._encoder_group = group

    @property
    def shares_encoder(self) -> bool:
        return sum(not p.closed for p in self._encoder_group) > 1

    def _leave_encoder_group(self) -> None:
        """Before this context is freed: move a shared encoder onto a context that stays."""
        survivors = [p for p in self._encoder_group if p is not self and not p.closed]
        if survivors:
            check(lib.sdcpp_rebind_encoder(survivors[0]._ctx))
            self._encoder_group.remove(self)
            self._encoder_group = [self]
