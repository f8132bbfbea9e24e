"""Sweeps on Ray (extra ``[ray]``): a grid's rows as a Ray Data job over an actor pool.

Each actor holds one resident Pipeline (loaded once, ``n_threads`` from the CPUs Ray
gave it) and makes work units: rows of one model set and one prompt, so a prompt is
encoded once per unit. Images come back to the driver, which writes them by row id
(:class:`sdcpp_py.batch.OutputDir`: whole files by rename, the record last, a second
copy dropped), so the same grid gives the same files here as in one process
(:func:`sdcpp_py.batch.run`).

Faults: an actor or node that dies takes its unit with it; Ray Data restarts the
actor (on another node if its node is gone) and retries the unit, and what is still
missing after a pass runs again, up to ``passes`` times. A re-run after a crash of
the driver skips the rows already written.

>>> from sdcpp_py import grid
>>> from sdcpp_py.ray import run_grid
>>> report = run_grid(grid.load("grid.yaml"), "out", address="auto", actors=4, cpus_per_actor=4)
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import backends
from ..batch import OutputDir, RowOutput, RowWorker, SweepReport, group_by_prompt, pending
from ..errors import InvalidArgumentError, SdcppError
from ..grid import Grid, Row, rows_from_table
from ..modelset import ModelSet

logger = logging.getLogger("sdcpp_py")
__all__ = ["SweepActor", "run_grid", "run_table"]
TASK_RETRIES = 3       # per work unit and pass; passes run again what is still missing


def _require_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("sdcpp_py.ray needs Ray Data: pip install 'sdcpp-py[ray]'") from None
    return ray


def _init(ray: Any, address: str | None) -> None:
    """ray.init; from a folder holding another copy of the package (a source checkout beside an
    installed wheel), from the installed package's folder instead: Ray puts the driver's folder
    first on its workers' sys.path, so they would import that copy, not the driver's."""
    import sdcpp_py

    # a cluster we start has no dashboard (an HTTP server on all interfaces, not ours to open)
    options = {"log_to_driver": False, "configure_logging": False, **({} if address else {"include_dashboard": False})}
    ours = Path(sdcpp_py.__file__).resolve().parent
    shadow = Path.cwd() / "sdcpp_py"
    if not shadow.is_dir() or shadow.resolve() == ours:
        ray.init(address=address, **options)
        return
    logger.info("starting Ray from %s: ./sdcpp_py is not the package in use (%s)", ours.parent, ours)
    here = os.getcwd()
    os.chdir(ours.parent)
    try:
        ray.init(address=address, **options)
    finally:
        os.chdir(here)


def _assigned_cpus(default: int) -> int:
    """The CPUs Ray assigned to this actor (not $OMP_NUM_THREADS, which a user may have set)."""
    import ray

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")  # type: ignore[no-untyped-call]
    except Exception:               # not in a Ray worker
        cpus = None
    return max(1, int(cpus)) if cpus else default


def _node_id() -> str | None:
    import ray

    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return None


class SweepActor:
    """The actor of the pool: one RowWorker (one resident Pipeline) per actor process."""

    def __init__(self, models: dict[str, dict[str, Any]], cpu_variant: str | None = None,
                 n_threads: int | None = None, require_cpu: str | None = None) -> None:
        sets = {name: ModelSet(name, m["files"], m["settings"], m["preset"]) for name, m in models.items()}
        self.worker = RowWorker(sets, n_threads=n_threads or _assigned_cpus(1), cpu_variant=cpu_variant,
                                require_cpu=require_cpu)
        self.node_id = _node_id()
        logger.info("sweep actor on %s: %s CPU module, %d threads", self.worker.node, self.worker.cpu_variant,
                    self.worker.n_threads or 0)

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, list[Any]]]:
        """One output block per row, sent back as it is made (the pass sets the block size so);
        rows of a unit cut short are written already, their copies from the retry dropped."""
        for unit in batch["unit"]:
            rows = [Row.from_dict(d) for d in json.loads(str(unit))]
            for made in self.worker.run(rows):
                made.record["ray_node"] = self.node_id
                yield {"row_id": [made.row_id], "png": [made.png], "record": [json.dumps(made.record)]}


def _model_payload(models: dict[str, ModelSet]) -> dict[str, dict[str, Any]]:
    """What the actors are built from: paths made absolute here (a ModelSet made by hand may hold
    relative ones, which a worker would resolve against its own folder)."""
    return {name: {"files": {k: str(Path(v).expanduser().absolute()) for k, v in m.files.items()},
                   "settings": m.settings, "preset": m.preset} for name, m in models.items()}


def _pass(ray: Any, grid: Grid, todo: dict[str, list[Row]], out: OutputDir, *, actors: int,
          cpus_per_actor: float, cpu_variant: str | None, require_cpu: str | None, unit_rows: int) -> None:
    units = [unit for rows in todo.values() for unit in group_by_prompt(rows, parts=actors, max_rows=unit_rows)]
    units.sort(key=lambda u: u[0].model)     # one model set after the other; a prompt's units side by side
    items = [{"unit": json.dumps([r.to_dict() for r in u])} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Ray Data's actor pools spread their actors over the nodes (SPREAD) and restart dead ones
    # (max_restarts=-1); a task is retried TASK_RETRIES times, not forever (its default), so a
    # row that kills its actor every time fails the pass instead of looping
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=Warning)
        made = ds.map_batches(SweepActor, batch_size=1, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=min(actors, len(items)),
                                                                 max_tasks_in_flight_per_actor=1),
                              fn_constructor_kwargs={"models": _model_payload(grid.models),
                                                     "cpu_variant": cpu_variant, "require_cpu": require_cpu},
                              num_cpus=cpus_per_actor, max_task_retries=TASK_RETRIES)
    ctx = made.context
    ctx.target_max_block_size = 1            # every row its own block, sent back as it is made
    ctx.execution_no_progress_timeout_s = -1  # a unit of 1 MP rows on one CPU outlasts the 30 min guard
    for row in made.iter_rows():
        out.write(RowOutput(str(row["row_id"]), bytes(row["png"]), json.loads(str(row["record"]))))


def run_grid(grid: Grid, out_dir: str | Path, *, address: str | None = None, actors: int = 1,
             cpus_per_actor: float = 1, cpu_variant: str | None = None, passes: int = 3,
             unit_rows: int = 8, allow_other_cpu: bool = False) -> SweepReport:
    """Make the grid's missing rows on Ray: ``actors`` actors of ``cpus_per_actor`` CPUs each
    (spread over the nodes); images and records written under ``out_dir`` on this machine,
    then ``results.parquet``. ``address``: a running cluster ("auto", "ray://host:10001");
    None starts (or joins) a local one. ``cpu_variant`` pins ggml's CPU module on every node
    (images differ by a few levels between AVX2 and AVX-512 modules). ``unit_rows``: rows per
    work unit at most (a prompt's rows are split into units; an actor keeps a prompt's encoding
    in its cache for the next unit of that prompt). The folder records the CPU module its images
    are made with; actors on another one refuse unless ``allow_other_cpu``."""
    ray = _require_ray()
    if actors < 1 or cpus_per_actor <= 0 or passes < 1 or unit_rows < 1:
        raise InvalidArgumentError("actors, passes and unit_rows must be >= 1 and cpus_per_actor > 0")
    start = time.perf_counter()
    ours = not ray.is_initialized()          # Ray started here is shut down here
    if ours:
        _init(ray, address)
    try:
        return _run(ray, grid, Path(out_dir), start, actors=actors, cpus_per_actor=cpus_per_actor,
                    cpu_variant=cpu_variant, passes=passes, unit_rows=unit_rows, allow_other_cpu=allow_other_cpu)
    finally:
        if ours:
            ray.shutdown()


def _run(ray: Any, grid: Grid, out_dir: Path, start: float, *, actors: int, cpus_per_actor: float,
         cpu_variant: str | None, passes: int, unit_rows: int, allow_other_cpu: bool) -> SweepReport:
    out = OutputDir(out_dir)
    require = out.claim(cpu_variant or backends.cpu_variant(), allow_other_cpu)
    todo, skipped = pending(grid, out)
    for attempt in range(passes):
        if not todo:
            break
        if attempt:
            logger.warning("pass %d: %d rows still missing, running them again", attempt + 1,
                           sum(map(len, todo.values())))
        try:
            _pass(ray, grid, todo, out, actors=actors, cpus_per_actor=cpus_per_actor, cpu_variant=cpu_variant,
                  require_cpu=require, unit_rows=unit_rows)
        except Exception as e:
            # a fault Ray could not ride out: what is written stays, the rest runs again; an
            # error of ours (a model that does not load, a bad row) would only repeat
            ours = (SdcppError, TypeError, ValueError, getattr(ray.exceptions, "UserCodeException", SdcppError))
            if attempt == passes - 1 or isinstance(e, ours):   # Ray's task errors are instances of their cause
                raise
            logger.warning("pass %d stopped (%s): running the missing rows again", attempt + 1, e)
        todo, _ = pending(grid, out)
    table = out.write_table(grid.rows)
    missing = [r.row_id for rows in todo.values() for r in rows]
    return SweepReport(len(grid.rows), len(out.written), skipped, out.duplicates, table,
                       time.perf_counter() - start, missing)


def run_table(table: Any, models: dict[str, ModelSet], out_dir: str | Path, **kwargs: Any) -> SweepReport:
    """:func:`run_grid` for a table of rows (dicts or a pandas DataFrame: prompt, seed and any
    other Pipeline.generate argument, a ``model`` column naming the model set)."""
    return run_grid(Grid(models, rows_from_table(models, table)), out_dir, **kwargs)
