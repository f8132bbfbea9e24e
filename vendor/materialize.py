#!/usr/bin/env python3
"""Materialise the pinned stable-diffusion.cpp source tree under vendor/.

The source is never committed. It comes from the sdist of a registry package
(pinned by name, version and sha256 in ``vendor/pin.json``), is cut down to
what the build needs, and our patches from ``vendor/patches/`` are applied in
order. A stamp file records the pin and the patches, so the step is a no-op
when the tree is current and redone when either changes.

Usage: python vendor/materialize.py [--force] [--tarball PATH]

Only the standard library is used; pip (run as a subprocess) fetches the sdist.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parent
PIN_FILE = VENDOR / "pin.json"
PATCH_DIR = VENDOR / "patches"
DOWNLOAD_DIR = VENDOR / ".download"
STAMP_NAME = ".sdcpp_py_stamp"

# Paths inside upstream's tree that a build needs (directories are taken whole,
# less EXCLUDE). Everything else in the sdist (docs, Dockerfiles, the server
# example, libwebp/libwebm sources, ggml tests) stays out.
KEEP = (
    "CMakeLists.txt",
    "LICENSE",
    "include/",
    "src/",
    "thirdparty/",
    "examples/cli/",
    "examples/common/",
    "ggml/CMakeLists.txt",
    "ggml/LICENSE",
    "ggml/ggml.pc.in",
    "ggml/cmake/",
    "ggml/include/",
    "ggml/src/",
)
EXCLUDE = ("thirdparty/libwebp/", "thirdparty/libwebm/")


class MaterializeError(RuntimeError):
    pass


def load_pin() -> dict:
    return json.loads(PIN_FILE.read_text())


def patch_files() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def expected_stamp(pin: dict) -> str:
    h = hashlib.sha256()
    h.update(f"{pin['package']}=={pin['version']} {pin['sha256']}\n".encode())
    for p in patch_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sdist_name(pin: dict) -> str:
    return f"{pin['package'].replace('-', '_')}-{pin['version']}.tar.gz"


def fetch_sdist(pin: dict) -> Path:
    """Return the pinned sdist, downloading it with pip (hash required) if needed."""
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    target = DOWNLOAD_DIR / sdist_name(pin)
    if target.exists() and sha256_of(target) == pin["sha256"]:
        return target
    req = DOWNLOAD_DIR / "requirements.txt"
    req.write_text(f"{pin['package']}=={pin['version']} --hash=sha256:{pin['sha256']}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--require-hashes", "-r", str(req), "-d", str(DOWNLOAD_DIR), "--disable-pip-version-check"]
    try:
        import scikit_build_core  # noqa: F401  (the sdist's metadata hook needs it)
        cmd.append("--no-build-isolation")
    except ImportError:
        pass
    print("materialize: " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0 or not target.exists():
        raise MaterializeError(
            f"could not download {pin['package']}=={pin['version']} from the package index "
            f"(pip exited {result.returncode}). Check network access to PyPI, or fetch it "
            f"elsewhere and run: python vendor/materialize.py --tarball PATH")
    digest = sha256_of(target)
    if digest != pin["sha256"]:
        target.unlink()
        raise MaterializeError(f"{target.name}: sha256 {digest} != pinned {pin['sha256']}")
    return target


def _wanted(rel: str) -> bool:
    if any(rel.startswith(e) for e in EXCLUDE):
        return False
    return any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in KEEP)


def extract(tarball: Path, dest: Path, pin: dict) -> int:
    prefix = f"{pin['package'].replace('-', '_')}-{pin['version']}/vendor/stable-diffusion.cpp/"
    count = 0
    with tarfile.open(tarball) as tar:
        for member in tar:
            if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                continue
            rel = member.name[len(prefix):]
            if not rel or not _wanted(rel):
                continue
            out = dest / rel
            if member.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with src, out.open("wb") as f:
                shutil.copyfileobj(src, f)
            os.chmod(out, 0o644)
            count += 1
    if count == 0:
        raise MaterializeError(f"{tarball.name} holds no {prefix}: not the pinned sdist?")
    return count


def apply_patches(tree: Path) -> None:
    patch_exe = shutil.which("patch")
    if patch_exe is None:
        raise MaterializeError("the 'patch' program is needed (Debian: apt-get install patch)")
    for p in patch_files():
        result = subprocess.run([patch_exe, "-p1", "--batch", "--forward", "--silent",
                                 "-d", str(tree), "-i", str(p)], capture_output=True, text=True)
        if result.returncode != 0:
            raise MaterializeError(f"patch {p.name} does not apply:\n{result.stdout}{result.stderr}")
        print(f"materialize: applied {p.name}", flush=True)


def materialize(force: bool = False, tarball: Path | None = None) -> Path:
    pin = load_pin()
    dest = VENDOR.parent / pin["source_root"]
    stamp = expected_stamp(pin)
    stamp_file = dest / STAMP_NAME
    if not force and stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        print(f"materialize: {dest} is current", flush=True)
        return dest
    if tarball is not None:
        if sha256_of(tarball) != pin["sha256"]:
            raise MaterializeError(f"{tarball}: sha256 does not match the pin")
    else:
        tarball = fetch_sdist(pin)
    tmp = Path(tempfile.mkdtemp(prefix=".materialize-", dir=VENDOR))
    try:
        n = extract(tarball, tmp, pin)
        apply_patches(tmp)
        (tmp / STAMP_NAME).write_text(stamp + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"materialize: {n} files of {pin['package']} {pin['version']} "
          f"(stable-diffusion.cpp {pin['upstream_version']}) -> {dest}", flush=True)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="re-extract even if the stamp matches")
    ap.add_argument("--tarball", type=Path, help="use this copy of the pinned sdist")
    args = ap.parse_args()
    try:
        materialize(args.force, args.tarball)
    except MaterializeError as e:
        print(f"materialize: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
