"""What tells files apart: one module for the three strengths of a file's identity.

- :func:`stamp`: size and modification time (a reload checks that its file was not replaced);
- :func:`identity`: the content's identity, a hash of the size, the first 8 MiB (a model file's
  header: names, shapes, types) and the last 1 MiB, cached by path, size and mtime (sweep ids,
  encoding caches, encoder sharing: the same weights under another name are the same file);
- :func:`file_hash`: the whole file's SHA-256 prefix (PNG metadata), cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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


def _hash_cache_file() -> Path:
    base = os.environ.get("SDCPP_PY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdcpp_py")
    return Path(base) / "file-hashes.json"


def file_hash(path: Path) -> str:
    """The first HASH_CHARS hex digits of the file's SHA-256, cached by path, size and mtime."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    cache_file = _hash_cache_file()
    with _lock:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        cached = cache.get(key) if isinstance(cache, dict) else None
        if isinstance(cached, str):
            return cached
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        digest = h.hexdigest()[:HASH_CHARS]
        cache = cache if isinstance(cache, dict) else {}
        cache[key] = digest
        cache = dict(list(cache.items())[-_HASH_CACHE_ENTRIES:])   # the newest entries
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError as e:
            logger.debug("file hash cache not written: %s", e)
        return digest
