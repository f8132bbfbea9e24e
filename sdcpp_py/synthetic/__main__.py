"""Command line: write a synthetic model set and print its paths.

    python -m sdcpp_py.synthetic --family flux2-klein --size tiny --out DIR [--dit-type q8_0] ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .dtypes import FORMATS, WEIGHT_TYPES
from .layouts import COMPONENTS, FAMILIES, SIZES
from .models import write_component, write_model_set


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sdcpp_py.synthetic",
        description="Write synthetic (random-weight, real-layout) models that stable-diffusion.cpp loads.",
    )
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--size", default="tiny", choices=SIZES)
    p.add_argument("--out", required=True, help="output folder (also a cache: complete files are reused)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", dest="fmt", default="gguf", choices=FORMATS)
    p.add_argument("--dit-type", default="f16", type=str.lower, choices=WEIGHT_TYPES)
    p.add_argument("--llm-type", default="f16", type=str.lower, choices=WEIGHT_TYPES)
    p.add_argument("--vae-type", default="f16", type=str.lower, choices=WEIGHT_TYPES)
    p.add_argument("--component", choices=COMPONENTS, help="write only this component")
    p.add_argument("--overwrite", action="store_true", help="write files again even if present")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints ``component<TAB>path`` lines. Returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.component:
            wtype = {"dit": args.dit_type, "llm": args.llm_type, "vae": args.vae_type}[args.component]
            path = write_component(args.family, args.component, args.out, size=args.size, seed=args.seed,
                                   wtype=wtype, fmt=args.fmt, overwrite=args.overwrite)
            print(f"{args.component}\t{path}")
            return 0
        ms = write_model_set(args.family, args.out, size=args.size, seed=args.seed, dit_type=args.dit_type,
                             llm_type=args.llm_type, vae_type=args.vae_type, fmt=args.fmt,
                             overwrite=args.overwrite)
    except ValueError as e:
        parser.error(str(e))
    print(f"diffusion_model\t{ms.diffusion_model}")
    print(f"llm\t{ms.llm}")
    print(f"vae\t{ms.vae}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
