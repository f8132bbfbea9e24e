"""The native context's handle and the components it holds: the text encoder and
the diffusion model (released and reloaded by the Engine), and the group of
contexts sharing one text encoder."""

from __future__ import annotations

from ._ffi import lib
from ._lib_types import SdCtx
from ._marshal import check

ENCODER, DIFFUSION = 0, 1                     # the shim's component ids
COMPONENT_FILE = {ENCODER: "llm", DIFFUSION: "diffusion_model"}
COMPONENT_NAME = {ENCODER: "text encoder", DIFFUSION: "diffusion model"}
# settings that decide where and in which form a text encoder lives: pipelines
# sharing one must agree on them (an encoder in Vulkan memory cannot run on the CPU)
SHARED_SETTINGS = ("wtype", "keep_clip_on_cpu", "offload_params_to_cpu", "enable_mmap")


class ContextHandle:
    """Owns one native context and knows the contexts it shares a text encoder with.

    Freed once, on the engine thread (``Engine.close``, or a pipeline's finalizer): a shared
    encoder runs on its loader's backend, so before that context goes the encoder is
    moved onto a context of the group that stays. Holds no reference to a pipeline.
    """

    def __init__(self, ptr: SdCtx) -> None:
        self.ptr: SdCtx | None = ptr
        self.group: set[ContextHandle] = {self}

    def join(self, other: ContextHandle) -> None:
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
        survivors = [c.ptr for c in self.group if c is not self and c.ptr is not None]
        if survivors:   # a failed move leaves this handle as it was: nothing freed, nothing leaked
            check(lib.sdcpp_rebind_encoder(survivors[0]))
        self.ptr = None
        self.group.discard(self)
        self.group = {self}
        lib.sdcpp_free_ctx(ptr)
