"""``sdcpp-py sweep --grid GRID -o DIR [--ray [ADDRESS]]``: a grid file's rows as images.

Without ``--ray`` the grid runs in this process; with it, on a Ray cluster (``--ray``
alone: a local one, or the one ``ray start`` made on this machine; ``--ray ADDRESS``:
that cluster). Either way the images are ``DIR/<row_id>.png`` (the settings inside),
``DIR/<row_id>.json`` and ``DIR/results.parquet``; rows already there are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .. import grid as grids
from ..batch import RowOutput, run
from .sdcli import CliError

logger = logging.getLogger("sdcpp_py")


def sweep_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sdcpp-py sweep", allow_abbrev=False,
                                 description="make a grid file's images (YAML or JSON: models, defaults, sweeps, "
                                             "rows), in this process or on Ray")
    ap.add_argument("--grid", required=True, type=Path, help="the grid file")
    ap.add_argument("-o", "--output", type=Path, default=Path("sweep"), help="output folder (default ./sweep)")
    ap.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run on Ray: alone, a local cluster (or this machine's); else the cluster's address")
    ap.add_argument("--actors", type=int, default=1, help="Ray: actors, each one resident pipeline (default 1)")
    ap.add_argument("--cpus-per-actor", type=float, default=1, help="Ray: CPUs per actor, its threads (default 1)")
    ap.add_argument("-t", "--threads", type=int, help="in-process: threads (default: the physical cores)")
    ap.add_argument("--cpu-variant", help="pin ggml's CPU module (e.g. haswell, zen4) on every node")
    ap.add_argument("--allow-other-cpu", action="store_true",
                    help="add to a folder made with another CPU module (its pixels differ by a few levels)")
    ap.add_argument("--unit-rows", type=int, default=8,
                    help="Ray: rows per work unit at most (what an actor's death can cost; default 8)")
    ap.add_argument("--passes", type=int, default=3, help="Ray: runs over what is still missing (default 3)")
    ap.add_argument("--dry-run", action="store_true", help="print the rows (and which are done); make nothing")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def sweep_command(argv: list[str]) -> int:
    args = sweep_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    grid = grids.load(args.grid)
    if args.dry_run:
        done = {p.stem for p in args.output.glob("*.json")} if args.output.is_dir() else set()
        for r in grid.rows:
            print(json.dumps({"row_id": r.row_id, "model": r.model, "sweeps": list(r.sweeps),
                              "done": r.row_id in done, **r.params}))
        return 0
    if args.ray is not None:
        from ..ray import run_grid

        try:
            import ray  # noqa: F401
        except ImportError:
            raise CliError("--ray needs Ray Data: pip install 'sdcpp-py[ray]'") from None
        report = run_grid(grid, args.output, address=args.ray or None, actors=args.actors,
                          cpus_per_actor=args.cpus_per_actor, cpu_variant=args.cpu_variant, passes=args.passes,
                          unit_rows=args.unit_rows, allow_other_cpu=args.allow_other_cpu)
    else:
        total = len(grid.rows)

        def show(made: RowOutput) -> None:
            print(f"{made.row_id}.png  {made.record['total_s']:.2f} s", file=sys.stderr)

        logger.info("%d rows", total)
        report = run(grid, args.output, n_threads=args.threads, cpu_variant=args.cpu_variant, on_row=show,
                     allow_other_cpu=args.allow_other_cpu)
    print(json.dumps(report.to_dict(), indent=2))
    return 0 if not report.missing else 1
