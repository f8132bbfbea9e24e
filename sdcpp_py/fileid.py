"""Files: three strengths of identity, and writing them whole. :func:`stamp` (size, mtime:
was it replaced?), :func:`identity` (a hash of the size, the first 8 MiB, a model's header,
and the last 1 MiB: the same weights under any name), :func:`file_hash` (the whole file's
SHA-256 prefix, for PNG metadata, cached on disk); :func:`write_whole` (by rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger("sdcpp_py")
HASH_CHARS = 10
HEAD_BYTES, TAIL_BYTES = 8 << 20, 1 << 20
_lock = threading.Lock()
_identities: dict[tuple[str, int, int], str] = {}
_HASH_CACHE_ENTRIES = 512


def stamp(path: Path | None) -> tuple[int, int] | None:
    """Size and modification time (None for no file)."""
    if path is None:
        return None
    st = path.stat()
    return (st.st_size, st.st_mtime_ns)


def identity(path: Path | None) -> str:
    """A content identity: 16 hex digits over the size, the head and the tail ("none" for no file)."""
    if path is None:
        return "none"
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _identities:
            return _identities[key]
    h = hashlib.sha256(str(st.st_size).encode())
    with p.open("rb") as f:
        h.update(f.read(HEAD_BYTES))
        if st.st_size > HEAD_BYTES:
            f.seek(max(HEAD_BYTES, st.st_size - TAIL_BYTES))
            h.update(f.read(TAIL_BYTES))
    digest = h.hexdigest()[:16]
    with _lock:
        _identities[key] = digest
    return digest


def cache_dir() -> Path:
    """The package's cache folder: ``$SDCPP_PY_CACHE``, else ``$XDG_CACHE_HOME/sdcpp_py``."""
    return Path(os.environ.get("SDCPP_PY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdcpp_py"))


def _read_umask() -> int:
    """The process's umask, read once at import (setting it to read it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def write_whole(path: Path, data: bytes, *, sync: bool = False) -> None:
    """Write ``path`` by rename from a temporary file beside it, with the umask's mode; ``sync``:
    the data and the rename on disk before returning."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def file_hash(path: Path) -> str:
    """The first HASH_CHARS hex digits of the file's SHA-256, cached by path, size and mtime."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    cache_file = cache_dir() / "file-hashes.json"
    with _lock:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        cache = cache if isinstance(cache, dict) else {}
        if isinstance(cache.get(key), str):
            return str(cache[key])
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        digest = h.hexdigest()[:HASH_CHARS]
        cache[key] = digest
        cache = dict(list(cache.items())[-_HASH_CACHE_ENTRIES:])   # the newest entries
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_whole(cache_file, json.dumps(cache).encode())
        except OSError as e:
            logger.debug("file hash cache not written: %s", e)
        return digest
