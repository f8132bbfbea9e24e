"""Model-file header readers: sdcpp_py.modelfile against the `gguf` and `safetensors` packages.

Reads the tensor list (names, shapes, types) and the metadata of synthetic files of the real
layouts, each reader in a fresh process: milliseconds of its first call and the best of
``--repeat``, and the peak RSS the calls add over the process after its imports. Also feeds each reader the broken files the tests
use and prints what it raises. Needs ``pip install gguf safetensors``.

    python benchmarks/header_readers.py [--dir /tmp/header-bench] [--repeat 5]

Files: the tiny Z-Image-Turbo set (GGUF and safetensors), and full-size headers as sparse
files (the data section is a hole: no reader here touches it): the Z-Image DiT (Q8_0 GGUF),
the Qwen3-4B text encoder as a real llama.cpp GGUF carries it (Q8_0 plus its tokenizer:
151,936 tokens, 151,387 merges), and the FLUX.1 VAE (F16 safetensors).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

READERS = ("ours", "gguf", "safetensors")


# -- the readers (run in the child) ---------------------------------------------------------------
def read_ours(path: str) -> tuple[int, int]:
    from sdcpp_py.modelfile import inspect
    f = inspect(path)
    return len(f.tensors), len(f.metadata)


def read_gguf(path: str) -> tuple[int, int]:
    import gguf
    r = gguf.GGUFReader(path)
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for t in r.tensors}
    return len(tensors), len(r.fields)


def read_safetensors(path: str) -> tuple[int, int]:
    from safetensors import safe_open
    with safe_open(path, "np") as f:
        tensors = {}
        for k in f.keys():
            s = f.get_slice(k)
            tensors[k] = (tuple(s.get_shape()), s.get_dtype())
        return len(tensors), len(f.metadata() or {})


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> float:
    """Reset the peak RSS to the current one (Linux: clear_refs 5); returns the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mib("VmRSS")


def child(reader: str, path: str, repeat: int) -> None:
    import time
    fn = {"ours": read_ours, "gguf": read_gguf, "safetensors": read_safetensors}[reader]
    # import what the reader needs before the baseline
    if reader == "ours":
        import sdcpp_py.modelfile  # noqa: F401
    elif reader == "gguf":
        import gguf  # noqa: F401
    else:
        import safetensors  # noqa: F401
    base = _reset_peak_rss()
    times = []
    counts: tuple[int, int] = (0, 0)
    for _ in range(repeat):
        t0 = time.perf_counter()
        counts = fn(path)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"first": times[0], "best": min(times), "rss_mib": _status_mib("VmHWM") - base,
                      "tensors": counts[0], "metadata": counts[1]}))


def child_error(reader: str, path: str) -> None:
    fn = {"ours": read_ours, "gguf": read_gguf, "safetensors": read_safetensors}[reader]
    try:
        counts = fn(path)
        print(f"no error ({counts[0]} tensors)")
    except Exception as e:
        print(f"{type(e).__module__}.{type(e).__name__}: {str(e)[:110]}")


# -- the files --------------------------------------------------------------------------------------
def _gguf_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _string_array(key: str, items: list[bytes]) -> bytes:
    return _gguf_str(key) + struct.pack("<IIQ", 9, 8, len(items)) + b"".join(_gguf_str(s) for s in items)


def write_sparse_gguf(path: Path, family: str, component: str, wtype: str, tokenizer: bool) -> None:
    """A GGUF of the full-size layout whose data section is a hole (a sparse file)."""
    from sdcpp_py.synthetic import component_specs
    from sdcpp_py.synthetic.writer import gguf_header, plan_tensors
    planned = plan_tensors(component_specs(family, component, size="full"), wtype, "gguf")
    header, offsets = gguf_header(planned, {"general.architecture": "qwen3" if component == "llm" else "z_image",
                                            "general.name": f"synthetic full {component}"})
    if tokenizer:   # splice tokenizer arrays in after the fixed part, then pad to the alignment again
        rnd = random.Random(0)
        alphabet = "abcdefghijklmnopqrstuvwxyzĠ"
        tokens = [("".join(rnd.choice(alphabet) for _ in range(rnd.randint(2, 12)))).encode() for _ in range(151936)]
        merges = [tokens[rnd.randrange(len(tokens))] + b" " + tokens[rnd.randrange(len(tokens))]
                  for _ in range(151387)]
        extra = (_gguf_str("tokenizer.ggml.model") + struct.pack("<I", 8) + _gguf_str("gpt2")
                 + _string_array("tokenizer.ggml.tokens", tokens)
                 + _gguf_str("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 5, len(tokens))
                 + struct.pack(f"<{len(tokens)}i", *([1] * len(tokens)))
                 + _string_array("tokenizer.ggml.merges", merges))
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", header[:24])
        body = header[24:_unpadded_len(header, len(planned))]   # the key-values and tensor infos, unpadded
        raw = struct.pack("<4sIQQ", magic, version, n_tensors, n_kv + 4) + extra + body
        header = raw + b"\0" * (-len(raw) % 32)
    last = planned[-1]
    size = len(header) + offsets[-1] + last.nbytes + (-last.nbytes % 32)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)


def _unpadded_len(header: bytes, n_tensors: int) -> int:
    """Where the tensor infos of a header written by gguf_header end."""
    import io
    f = io.BytesIO(header)
    f.seek(8)
    _, n_kv = struct.unpack("<QQ", f.read(16))
    def skip_str() -> None:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, 1)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    for _ in range(n_kv):
        skip_str()
        (vt,) = struct.unpack("<I", f.read(4))
        if vt == 8:
            skip_str()
        else:
            f.seek(sizes[vt], 1)
    for _ in range(n_tensors):
        skip_str()
        (nd,) = struct.unpack("<I", f.read(4))
        f.seek(8 * nd + 4 + 8, 1)
    return f.tell()


def write_sparse_safetensors(path: Path, family: str, component: str) -> None:
    from sdcpp_py.synthetic import component_specs
    from sdcpp_py.synthetic.writer import plan_tensors, safetensors_header
    planned = plan_tensors(component_specs(family, component, size="full", fmt="safetensors"), "f16",
                           "safetensors")
    header = safetensors_header(planned, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(t.nbytes for t in planned))


def make_files(d: Path) -> dict[str, Path]:
    from sdcpp_py.synthetic import write_model_set
    d.mkdir(parents=True, exist_ok=True)
    g = write_model_set("z-image-turbo", d, size="tiny", seed=0)
    s = write_model_set("z-image-turbo", d, size="tiny", seed=0, fmt="safetensors")
    files = {"tiny DiT (GGUF F16)": g.diffusion_model, "tiny LLM (GGUF F16)": g.llm,
             "tiny VAE (safetensors)": s.vae}
    full = {"full DiT (GGUF Q8_0, sparse)": (d / "full-dit-q8_0.gguf", "dit", False),
            "full Qwen3-4B + tokenizer (GGUF Q8_0, sparse)": (d / "full-llm-q8_0-tok.gguf", "llm", True)}
    for label, (p, comp, tok) in full.items():
        if not p.exists():
            write_sparse_gguf(p, "z-image-turbo", comp, "q8_0", tok)
        files[label] = p
    vae = d / "full-vae-f16.safetensors"
    if not vae.exists():
        write_sparse_safetensors(vae, "z-image-turbo", "vae")
    files["full VAE (safetensors F16, sparse)"] = vae
    return files


def make_broken(d: Path, files: dict[str, Path]) -> dict[str, Path]:
    """The broken files of tests/test_errors.py, and a few more."""
    import numpy as np
    dit = files["tiny DiT (GGUF F16)"].read_bytes()
    vae = files["tiny VAE (safetensors)"].read_bytes()
    n = struct.unpack("<Q", vae[:8])[0]
    out = {"GGUF cut in half": dit[: len(dit) // 2], "GGUF cut in its header": dit[:200],
           "empty file": b"", "GGUF version 99": dit[:4] + struct.pack("<I", 99) + dit[8:],
           "4 KiB of random bytes": np.random.default_rng(0).bytes(4096),
           "safetensors cut in its data": vae[: len(vae) // 2], "safetensors cut in its header": vae[: 8 + n // 2]}
    paths = {}
    for name, data in out.items():
        ext = ".safetensors" if "safetensors" in name or "random" in name else ".gguf"
        p = d / ("broken-" + name.replace(" ", "-") + ext)
        p.write_bytes(data)
        paths[name] = p
    return paths


def run_child(args: list[str]) -> str:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode != 0:
        return f"failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    return r.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "header-bench")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child-error", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.repeat)
    if a.child_error:
        return child_error(*a.child_error)
    files = make_files(a.dir)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; first call and best of {a.repeat} in one "
          "process; MiB: peak RSS added over the process after its imports\n")
    print("| file | size | reader | tensors | first ms | best ms | MiB |\n|---|---|---|---|---|---|---|")
    for label, p in files.items():
        readers = ("ours", "gguf") if p.suffix == ".gguf" else ("ours", "safetensors")
        for r in readers:
            out = run_child(["--child", r, str(p), "--repeat", str(a.repeat)])
            try:
                res = json.loads(out)
                print(f"| {label} | {p.stat().st_size / 2**20:.0f} MiB | {r} | {res['tensors']} | "
                      f"{res['first'] * 1e3:.1f} | {res['best'] * 1e3:.1f} | {res['rss_mib']:.1f} |")
            except json.JSONDecodeError:
                print(f"| {label} | | {r} | {out} | | | |")
    print("\n| broken file | reader | raises |\n|---|---|---|")
    for name, p in make_broken(a.dir, files).items():
        readers = ("ours", "gguf") if p.suffix == ".gguf" else ("ours", "safetensors", "gguf")
        for r in readers:
            print(f"| {name} | {r} | {run_child(['--child-error', r, str(p)])} |")


if __name__ == "__main__":
    main()
