"""Model families and the checks that keep bad file sets away from the engine.

stable-diffusion.cpp detects the family from tensor names and aborts the
process on several mismatches (e.g. a text encoder whose width the DiT does not
expect reaches a failed GGML_ASSERT in a matmul). ``check_components`` reads
the headers and raises a Python exception for what would fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import IncompatibleModelError, ModelLoadError
from .modelfile import ModelFile, inspect

Z_IMAGE = "z-image"
FLUX2_KLEIN = "flux2-klein"
FLUX2_DEV = "flux2-dev"
UNKNOWN = "unknown"

# Latent channels of the VAE each family decodes with.
VAE_CHANNELS = {Z_IMAGE: 16, FLUX2_KLEIN: 32, FLUX2_DEV: 32}
# Hidden layers whose outputs the conditioners read (concatenated); with none of
# them present the final-norm output is used (stable-diffusion.cpp, conditioner.hpp).
_LLM_OUT_LAYERS = {Z_IMAGE: (35,), FLUX2_KLEIN: (9, 18, 27)}
# The prompt templates use Qwen's special tokens (ids up to 151668): a smaller
# vocabulary makes the embedding lookup fail an assert.
MIN_QWEN_VOCAB = 151669
FLUX2_HEAD_DIM = 128      # fixed in the engine; the DiT width must be a multiple


@dataclass(frozen=True)
class Components:
    """What the headers of a model file set say (sizes in elements)."""

    family: str
    dit_hidden: int | None = None
    dit_context_dim: int | None = None   # text-encoder width the DiT expects
    llm_hidden: int | None = None
    llm_layers: int | None = None
    vae_channels: int | None = None
    llm_vocab: int | None = None
    vae_has_encoder: bool = True            # False: a decode-only VAE file (text-to-image only)

    @property
    def llm_output_dim(self) -> int | None:
        """Width of the conditioning the text encoder will produce for this family."""
        if self.llm_hidden is None or self.llm_layers is None:
            return None
        used = [n for n in _LLM_OUT_LAYERS.get(self.family, ()) if n <= self.llm_layers]
        return self.llm_hidden * max(len(used), 1)


def detect_family(f: ModelFile) -> str:
    """Family of a diffusion model, by the tensors stable-diffusion.cpp keys on."""
    if f.find("cap_embedder.0.weight") is not None:
        return Z_IMAGE
    if f.find("double_stream_modulation_img.lin.weight") is not None:
        return FLUX2_DEV if f.find("single_blocks.47.linear1.weight") is not None else FLUX2_KLEIN
    return UNKNOWN


def _dit_sizes(f: ModelFile, family: str) -> tuple[int | None, int | None]:
    if family == Z_IMAGE:
        t = f.find("cap_embedder.1.weight")  # (hidden, cap_feat_dim)
    elif family in (FLUX2_KLEIN, FLUX2_DEV):
        t = f.find("txt_in.weight")  # (hidden, context_in_dim)
    else:
        return None, None
    if t is None or len(t.shape) != 2:
        raise IncompatibleModelError(f"{f.path}: {family} model without a usable text projection")
    return t.shape[0], t.shape[1]


def _llm_sizes(f: ModelFile) -> tuple[int | None, int | None, int | None]:
    """(hidden, layers, vocabulary) of a text encoder; the embedding is (vocab, hidden)."""
    emb = f.find("token_embd.weight") or f.find("embed_tokens.weight")
    if emb is None or len(emb.shape) != 2:
        return None, None, None
    layers = max(f.count_blocks("blk."), f.count_blocks("layers."))
    return emb.shape[1], layers, emb.shape[0]


def _vae_channels(f: ModelFile) -> int | None:
    t = f.find("decoder.conv_in.weight")  # (width, latent channels, 3, 3)
    return t.shape[1] if t is not None and len(t.shape) == 4 else None


def check_components(*, model: Path | None = None, diffusion_model: Path | None = None,
                     llm: Path | None = None, vae: Path | None = None) -> Components:
    """Inspect the given files and raise if they cannot work together.

    Missing files raise ModelNotFoundError, unreadable ones CorruptModelError,
    mismatched ones IncompatibleModelError. Files of other families than the
    two targets pass with family ``"unknown"`` after the readability checks.
    """
    if model is None and diffusion_model is None:
        raise ModelLoadError("give a diffusion_model (or a single-file model)")
    files = {role: inspect(p) for role, p in
             (("model", model), ("diffusion_model", diffusion_model), ("llm", llm), ("vae", vae))
             if p is not None}
    dit = files.get("diffusion_model") or files["model"]
    family = detect_family(dit)
    if family == UNKNOWN:
        return Components(UNKNOWN)
    hidden, context_dim = _dit_sizes(dit, family)
    enc = files.get("llm") or files.get("model")
    llm_hidden, llm_layers, llm_vocab = _llm_sizes(enc) if enc is not None else (None, None, None)
    vae_file = files.get("vae") or files.get("model")
    vae_ch = _vae_channels(vae_file) if vae_file is not None else None
    vae_encoder = vae_file is not None and vae_file.find("encoder.conv_in.weight") is not None
    found = Components(family, hidden, context_dim, llm_hidden, llm_layers, vae_ch, llm_vocab, vae_encoder)
    if family in (FLUX2_KLEIN, FLUX2_DEV) and hidden is not None and hidden % FLUX2_HEAD_DIM:
        raise IncompatibleModelError(f"{dit.path}: FLUX.2 DiT width {hidden} is not a multiple of the "
                                     f"engine's head size {FLUX2_HEAD_DIM}")

    if family == FLUX2_DEV:
        return found  # Mistral text encoder: not checked here
    if llm_hidden is None:
        raise IncompatibleModelError(
            f"{family} needs a Qwen3 text encoder (llm=...): "
            + ("none given" if enc is None else f"{enc.path} has no token embedding"))
    if vae_ch is None:
        raise IncompatibleModelError(
            f"{family} needs a VAE (vae=...): "
            + ("none given" if vae_file is None else f"{vae_file.path} has no decoder.conv_in"))
    if llm_vocab is not None and llm_vocab < MIN_QWEN_VOCAB:
        raise IncompatibleModelError(f"text encoder {enc.path if enc else None} has a vocabulary of "
                                     f"{llm_vocab} tokens; "
                                     f"Qwen3's prompt template needs at least {MIN_QWEN_VOCAB}")
    want = VAE_CHANNELS[family]
    if vae_ch != want:
        raise IncompatibleModelError(
            f"wrong VAE for {family}: {vae_file.path if vae_file else None} has {vae_ch} latent channels, "
            f"{family} needs {want} (the FLUX.{1 if want == 16 else 2} VAE)")
    if found.llm_output_dim != context_dim:
        raise IncompatibleModelError(
            f"text encoder {enc.path if enc else None} (hidden {llm_hidden}, {llm_layers} layers) gives "
            f"{found.llm_output_dim}-wide conditioning; the {family} model expects {context_dim}")
    return found
