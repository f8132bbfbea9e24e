"""Grid rows into image files: a worker holding one resident Pipeline, and the output folder.

Both the in-process sweep (:func:`run`) and the Ray job (:mod:`sdcpp_py.ray`) go
through :class:`RowWorker` (rows of one prompt share one encoding: staged calls,
the same pixels as ``Pipeline.generate``) and :class:`OutputDir` (``<row_id>.png``
with the settings in it, then ``<row_id>.json``, each written whole by rename;
a row whose record exists is done, a second copy of it is dropped). So the same
grid gives the same files by either path, and a re-run makes only what is missing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from . import backends
from ._images import open_image
from ._version import __version__
from .errors import InvalidArgumentError
from .fileid import write_whole
from .grid import Grid, Row
from .metadata import image_parameters, png_bytes
from .modelset import ModelSet
from .pipeline import Pipeline

logger = logging.getLogger("sdcpp_py")


@dataclass
class RowOutput:
    """One made row: its PNG (settings embedded) and its record (a results-table row)."""

    row_id: str
    png: bytes
    record: dict[str, Any]


def group_by_prompt(rows: Iterable[Row], parts: int = 1, max_rows: int | None = None) -> list[list[Row]]:
    """Rows of one model set in work units, each of one prompt (one encoding per unit): at most
    ``max_rows`` rows each, and with fewer units than ``parts`` the largest are halved until
    there are ``parts``."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault(r.prompt_key, []).append(r)
    units = [g[i:i + (max_rows or len(g))] for g in groups.values() for i in range(0, len(g), max_rows or len(g))]
    while units and len(units) < parts:
        units.sort(key=len)
        if len(units[-1]) < 2:
            break
        big = units.pop()
        units += [big[: len(big) // 2], big[len(big) // 2:]]
    return units


class RowWorker:
    """Runs rows on one resident Pipeline at a time, (re)opened when the rows' model set changes;
    sets sharing a text encoder file hand it over instead of loading it again."""

    def __init__(self, models: dict[str, ModelSet], *, n_threads: int | None = None,
                 cpu_variant: str | None = None, require_cpu: str | None = None) -> None:
        self.models = models
        self.n_threads = n_threads
        self.cpu_variant = backends.load(cpu_variant)
        if require_cpu is not None and self.cpu_variant != require_cpu:
            raise InvalidArgumentError(other_cpu(require_cpu, self.cpu_variant))
        self.node = socket.gethostname()
        self.pipe: Pipeline | None = None
        self.model: str | None = None
        self.loads = 0
        self._load_s = 0.0

    def pipeline(self, model: str) -> Pipeline:
        if self.pipe is not None and self.model == model:
            return self.pipe
        old = self.pipe
        start = time.perf_counter()
        self.pipe, _ = Pipeline.open_set(self.models[model], donors=[old] if old is not None else [],
                                         **({"n_threads": self.n_threads} if self.n_threads is not None else {}))
        self._load_s = time.perf_counter() - start        # reported with the next row
        self.model = model
        self.loads += 1
        if old is not None:
            old.close()
        return self.pipe

    def run(self, rows: Sequence[Row]) -> Iterator[RowOutput]:
        """Make ``rows`` (any model sets), grouped by prompt, one image each."""
        by_model: dict[str, list[Row]] = {}
        for r in rows:
            by_model.setdefault(r.model, []).append(r)
        for unit in (u for group in by_model.values() for u in group_by_prompt(group)):
            yield from self._unit(unit)

    def _unit(self, rows: Sequence[Row]) -> Iterator[RowOutput]:
        pipe = self.pipeline(rows[0].model)
        weights: dict[str, Any] | None = None
        for row in rows:
            if row.model != rows[0].model:
                raise InvalidArgumentError("a work unit holds rows of one model set")
            p = dict(row.params)
            init, mask, control = p.pop("init_image", None), p.pop("mask", None), p.pop("control_image", None)
            refs = p.pop("ref_images", ())
            start = time.perf_counter()
            s = pipe.settings_for(**p)
            init_image = open_image(init) if init else None
            ref_images = [open_image(r) for r in refs]
            misses = pipe.encodings.info().misses
            control_image = open_image(control, "control_image") if control else None
            if control_image is not None and control_image.size != (s.width, s.height):
                control_image = control_image.resize((s.width, s.height), Image.Resampling.LANCZOS)
            item = next(pipe.images(s, init_image=init_image, ref_images=ref_images,
                                    mask=open_image(mask, "mask", "L") if mask else None, control_image=control_image))
            if pipe.encodings.info().misses == misses:      # the prompt's encoding came from the cache
                item.timings["encode_s"] = 0.0
            if weights is None:
                weights = pipe.weights
            png = png_bytes(item.image, image_parameters(pipe, item.settings, item.seed, weights,
                                                         control=control_image is not None))
            record = self._record(row, item.settings.to_dict(), item.timings, time.perf_counter() - start, weights)
            yield RowOutput(row.row_id, png, record)

    def _record(self, row: Row, settings: dict[str, Any], timings: dict[str, float], total_s: float,
                weights: dict[str, Any]) -> dict[str, Any]:
        rec: dict[str, Any] = {"row_id": row.row_id, "model": row.model, "sweeps": list(row.sweeps),
                               "prompt": settings["prompt"], "negative_prompt": settings["negative_prompt"],
                               "seed": int(row.params["seed"])}
        rec.update({k: v for k, v in settings.items() if k not in rec and k != "batch_count"
                    and not isinstance(v, (list, tuple))})      # every scalar field of the request
        rec["settings"] = json.dumps(settings, sort_keys=True)
        rec["params"] = json.dumps(row.params, sort_keys=True)
        rec.update({k: float(timings.get(k, 0.0)) for k in ("encode_s", "denoise_s", "decode_s")})
        rec["total_s"] = total_s
        rec["load_s"], self._load_s = self._load_s, 0.0       # the pipeline's load, on the first row after it
        rec["cpu_variant"] = self.cpu_variant
        rec["weights"] = json.dumps({k: weights.get(k) for k in ("components", "target", "reason")}, default=str)
        rec["n_threads"] = self.pipe.settings.n_threads if self.pipe is not None else None
        rec["node"] = self.node
        rec["pid"] = os.getpid()
        rec["sdcpp_py"] = __version__
        return rec

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None


@dataclass
class OutputDir:
    """``<row_id>.png`` and ``<row_id>.json`` per row; the record is written last, so a row is
    done exactly when its record exists."""

    path: Path
    duplicates: int = 0
    written: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    def claim(self, cpu_variant: str, allow_other_cpu: bool = False) -> str | None:
        """Record the CPU module the folder's images are made with (``.sweep.json``), or check it:
        another module's pixels differ by a few levels. Returns the module rows must be made with
        (None: any)."""
        manifest = self.path / ".sweep.json"
        try:
            recorded = json.loads(manifest.read_text()).get("cpu_variant")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded is None:
            write_whole(manifest, json.dumps({"cpu_variant": cpu_variant, "sdcpp_py": __version__}).encode())
            recorded = cpu_variant
        if allow_other_cpu:
            return None
        if recorded != cpu_variant:
            raise InvalidArgumentError(other_cpu(recorded, cpu_variant))
        return str(recorded)

    def done(self) -> set[str]:
        """The rows with both files (an image deleted by hand is made again)."""
        pngs = {p.stem for p in self.path.glob("*.png")}
        return {p.stem for p in self.path.glob("*.json") if not p.name.startswith(".") and p.stem in pngs}

    def _atomic(self, name: str, data: bytes) -> None:
        write_whole(self.path / name, data, sync=True)   # on disk before the next file (the record) is

    def write(self, out: RowOutput) -> bool:
        """Write one row's files; False (and nothing written) when the row is already done."""
        if (self.path / f"{out.row_id}.json").exists() and (self.path / f"{out.row_id}.png").exists():
            self.duplicates += 1
            logger.info("row %s is done already: second copy dropped", out.row_id)
            return False
        self._atomic(f"{out.row_id}.png", out.png)
        self._atomic(f"{out.row_id}.json", json.dumps(out.record, sort_keys=True).encode())
        self.written.append(out.row_id)
        return True

    def records(self, row_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        ids = sorted(self.done()) if row_ids is None else list(row_ids)
        return [json.loads((self.path / f"{i}.json").read_text()) for i in ids]

    def write_table(self, rows: Sequence[Row]) -> Path:
        """``results.parquet`` (needs pyarrow; else ``results.jsonl``) of the grid's done rows,
        in grid order."""
        done = self.done()
        recs = self.records([r.row_id for r in rows if r.row_id in done])
        try:
            import pyarrow as pa  # type: ignore[import-untyped]
            import pyarrow.parquet as pq  # type: ignore[import-untyped]
        except ImportError:
            logger.warning("pyarrow is not installed: results written as results.jsonl, not parquet")
            self._atomic("results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs).encode())
            return self.path / "results.jsonl"
        keys = sorted({k for r in recs for k in r})      # records of several runs (in-process, Ray) mix
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in recs]), buf)
        self._atomic("results.parquet", buf.getvalue())
        return self.path / "results.parquet"


@dataclass
class SweepReport:
    """What a sweep did: rows in the grid, made now, found done, and where the table is."""

    rows: int
    made: int
    skipped: int
    duplicates: int
    table: Path
    seconds: float
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "made": self.made, "skipped": self.skipped, "duplicates": self.duplicates,
                "missing": self.missing, "table": str(self.table), "seconds": round(self.seconds, 3)}


def pending(grid: Grid, out: OutputDir) -> tuple[dict[str, list[Row]], int]:
    """The rows still to make, per model set (in grid order), and how many are done."""
    done = out.done()
    todo: dict[str, list[Row]] = {}
    for r in grid.rows:
        if r.row_id not in done:
            todo.setdefault(r.model, []).append(r)
    return todo, sum(r.row_id in done for r in grid.rows)


def other_cpu(recorded: str, here: str) -> str:
    return (f"the sweep's images were made with ggml's {recorded} CPU module and this is {here}: its pixels "
            "differ by a few levels (pin the module with cpu_variant / --cpu-variant, or allow_other_cpu / "
            "--allow-other-cpu to mix them)")


def run(grid: Grid, out_dir: str | Path, *, n_threads: int | None = None, cpu_variant: str | None = None,
        on_row: Callable[[RowOutput], None] | None = None, allow_other_cpu: bool = False) -> SweepReport:
    """The grid in this process: one resident pipeline per model set, one after the other."""
    start = time.perf_counter()
    out = OutputDir(Path(out_dir))
    todo, skipped = pending(grid, out)
    worker = RowWorker(grid.models, n_threads=n_threads, cpu_variant=cpu_variant)
    out.claim(worker.cpu_variant, allow_other_cpu)
    try:
        for rows in todo.values():
            for made in worker.run(rows):
                out.write(made)
                if on_row is not None:
                    on_row(made)
    finally:
        worker.close()
    table = out.write_table(grid.rows)
    missing = [r.row_id for r in grid.rows if r.row_id not in out.done()]
    return SweepReport(len(grid.rows), len(out.written), skipped, out.duplicates, table,
                       time.perf_counter() - start, missing)
