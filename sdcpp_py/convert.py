"""Write a model file at another weight type, once, instead of converting at every load.

The engine's ``convert`` (what ``sd-cli -M convert`` runs): read a GGUF or
safetensors model (optionally with a VAE file, stored under ``vae.``), convert its
tensors to ``wtype`` (tensors whose row length the type's blocks do not divide keep
their type, as at load time) and ``tensor_type_rules``, and write a GGUF (or a
safetensors file, by the output's suffix). A K-quant conversion of the 6B Z-Image
DiT takes minutes; loading the written file takes seconds.

The output appears only when complete: the engine writes a temporary file beside
it, renamed on success. The conversion cannot be stopped midway (Ctrl-C waits for
it to finish; the partial file is removed).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .engine import convert as engine_convert
from .errors import GenerationError, InvalidArgumentError
from .fileid import UMASK
from .modelfile import inspect
from .settings import WEIGHT_TYPES, ProgressFn, check_type_rules

logger = logging.getLogger("sdcpp_py")
PathLike = str | Path


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    seconds: float
    types: dict[str, int]      # tensor count per type in the written file


def convert(model: PathLike, output: PathLike, *, wtype: str | None = None, vae: PathLike | None = None,
            tensor_type_rules: str | None = None, convert_name: bool = False,
            overwrite: bool = True, progress: ProgressFn | bool | None = None) -> ConvertResult:
    """Convert ``model`` (and ``vae``) to ``output`` at ``wtype`` (None: keep each tensor's type).

    ``tensor_type_rules``: the engine's ``regex=type,...`` per-tensor types.
    ``convert_name``: rename tensors to the engine's canonical names. ``progress``:
    ``fn(tensors_done, tensors, seconds)`` (True: a tqdm bar).
    """
    src = Path(model).expanduser().resolve()
    inspect(src)                                    # missing / corrupt: ModelLoadError subclasses
    vae_path = Path(vae).expanduser().resolve() if vae is not None else None
    if vae_path is not None:
        inspect(vae_path)
    out = Path(output).expanduser().resolve()
    if out.suffix not in (".gguf", ".safetensors"):
        raise InvalidArgumentError(f"{out}: the output must end in .gguf or .safetensors")
    if out in (src, vae_path):
        raise InvalidArgumentError(f"{out}: the output would overwrite an input")
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{out} exists")
    if not out.parent.is_dir():
        raise InvalidArgumentError(f"{out.parent}: no such directory")
    if wtype is not None and wtype not in WEIGHT_TYPES:
        raise InvalidArgumentError(f"weight type {wtype!r}: one of {', '.join(WEIGHT_TYPES)}")
    rules = check_type_rules(tensor_type_rules) if tensor_type_rules else ""

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~UMASK)          # mkstemp's 0600 would stay on the renamed file

    start = time.perf_counter()
    try:
        ok, errors = engine_convert(src, vae_path, tmp, wtype=wtype, rules=rules, convert_name=convert_name,
                                    progress=progress)
        if not ok:
            raise GenerationError(f"converting {src.name} failed" + (f":\n{errors}" if errors else ""))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    written = inspect(out)
    types: dict[str, int] = {}
    for t in written.tensors.values():
        types[t.dtype] = types.get(t.dtype, 0) + 1
    logger.info("converted %s to %s in %.1f s: %s", src.name, out, seconds, types)
    return ConvertResult(out, seconds, types)

