"""Command line: ``sdcpp-py`` (also ``python -m sdcpp_py``).

With no subcommand it takes sd-cli's command line (:mod:`.sdcli`): an article's
``sd-cli ...`` command runs unchanged as ``sdcpp-py ...``, with one resident process
for many prompts and seeds (:mod:`.run`). Subcommands: ``demo`` (a synthetic model
the package writes, no download), ``info`` (versions and CPU, or an image's
settings), ``download`` (a preset's real weights from the hub), ``convert`` (a model
file at another weight type, as ``-M convert``) and ``generate`` (the same as no
subcommand); ``serve`` (an HTTP server, :mod:`sdcpp_py.server`); ``sweep`` (a grid
file's images, in this process or on Ray, :mod:`.sweep`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ..errors import SdcppError
from ..fileid import cache_dir
from .sdcli import CliError, parse, print_error

DEMO_PROMPT = "a lighthouse on a rocky coast at dawn, oil painting"
DEMO_NOTE = """\
sdcpp-py demo: the image comes from a synthetic {family} model the package wrote, with random
weights: coloured noise, by design. It shows the install works, not what the model draws.
For a real image (several GB of downloads, then minutes per image on a CPU):
  sdcpp-py download {family}        # prints the paths of the three files
  sdcpp-py --diffusion-model DIFFUSION_MODEL --llm LLM --vae VAE -p "a lighthouse at dawn" -o lighthouse.png"""
SUBCOMMANDS = ("demo", "info", "download", "convert", "generate", "serve", "sweep")


def _setup_logging(verbose: int) -> None:
    logging.basicConfig(level=logging.WARNING if verbose == 0 else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sdcpp_py.native").setLevel(
        logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING)


def _sd_cli(argv: list[str]) -> int:
    args = parse(argv)
    _setup_logging(args.verbose)
    if args.mode == "metadata":
        if not args.image:
            raise CliError("metadata mode needs an image path (--image)")
        return _print_metadata(Path(args.image), args.metadata_format)
    if args.mode == "convert":
        return _convert(args)
    if args.mode == "upscale":
        return _upscale(args)
    from .run import run

    return run(args)


def _convert(args: argparse.Namespace) -> int:
    from ..convert import convert

    if not args.model:
        raise CliError("convert needs the input model: -m/--model")
    output = "output.gguf" if args.output == "output.png" else args.output
    result = convert(args.model, output, wtype=args.wtype, vae=args.vae, tensor_type_rules=args.tensor_type_rules,
                     convert_name=args.convert_name, progress=not args.no_progress)
    print(json.dumps({"output": str(result.path), "seconds": round(result.seconds, 3), "types": result.types},
                     indent=2))
    return 0


def _upscale(args: argparse.Namespace) -> int:
    """sd-cli's -M upscale: -i IMAGE through --upscale-model, --upscale-repeats times, to -o."""
    from .._images import open_image
    from ..fileid import write_whole
    from ..metadata import image_bytes
    from ..upscaler import Upscaler

    if args.upscale_model is None or not args.init_img:
        raise CliError("upscale mode needs --upscale-model and the image: -i/--init-img")
    image = open_image(args.init_img, "--init-img")
    start = time.perf_counter()
    with Upscaler(args.upscale_model, n_threads=args.threads if args.threads > 0 else None,
                  tile_size=args.upscale_tile_size) as upscaler:
        out = upscaler.upscale(image, args.upscale_repeats)
    path = Path(args.output)
    write_whole(path, image_bytes(out, path.suffix))
    print(json.dumps({"output": str(path), "size": list(out.size), "seconds": round(time.perf_counter() - start, 3)},
                     indent=2))
    return 0


def _print_metadata(image: Path, fmt: str) -> int:
    from ..metadata import read_parameters

    params = read_parameters(image)
    print(json.dumps(params.to_json(), indent=2) if fmt == "json" else params.to_text())
    return 0


def _demo(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sdcpp-py demo", allow_abbrev=False,
                                 description="generate with a synthetic model the package writes (no download); "
                                             "other flags: sd-cli's, as for sdcpp-py itself")
    ap.add_argument("--family", default="z-image-turbo", choices=["z-image-turbo", "flux2-klein"])
    ap.add_argument("--size", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--cache", type=Path, default=cache_dir())
    own, rest = ap.parse_known_args(argv)
    from ..synthetic import write_model_set

    models = write_model_set(own.family, own.cache / "synthetic", size=own.size, seed=0)
    defaults = ["-W", "256", "-H", "256", "--steps", "4", "-p", DEMO_PROMPT]
    files = ["--diffusion-model", str(models.diffusion_model), "--llm", str(models.llm), "--vae", str(models.vae)]
    code = _sd_cli(files + defaults + rest)     # later flags win
    if code == 0:
        print(DEMO_NOTE.format(family=own.family), file=sys.stderr)
    return code


def _info(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sdcpp-py info", allow_abbrev=False,
                                 description="versions, library and CPU features; or the settings stored in an image")
    ap.add_argument("image", nargs="?", type=Path, help="an image written by sdcpp-py or sd-cli")
    ap.add_argument("--metadata-format", choices=("text", "json"), default="text")
    args = ap.parse_args(argv)
    if args.image is not None:
        return _print_metadata(args.image, args.metadata_format)
    from ..system import system_info

    print(json.dumps(system_info(), indent=2))
    return 0


def _download(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sdcpp-py download", allow_abbrev=False,
                                 description="fetch a preset's real weights from the Hugging Face hub")
    ap.add_argument("preset")
    ap.add_argument("--quant", help="diffusion model quantisation, e.g. Q8_0, Q4_K, Q2_K")
    ap.add_argument("--llm-quant", default="Q4_K_M")
    args = ap.parse_args(argv)
    from ..presets import download

    paths = download(args.preset, quant=args.quant, llm_quant=args.llm_quant)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    rest = argv[1:] if command else argv
    try:
        if command == "demo":
            return _demo(rest)
        if command == "info":
            return _info(rest)
        if command == "download":
            return _download(rest)
        if command == "convert":
            return _sd_cli(["-M", "convert", *rest])
        if command == "serve":
            from .serve import serve_command

            return serve_command(rest)
        if command == "sweep":
            from .sweep import sweep_command

            return sweep_command(rest)
        return _sd_cli(rest)
    except CliError as e:
        return print_error(str(e))
    except SdcppError as e:
        return print_error(str(e))
    except KeyboardInterrupt:
        print("sdcpp-py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
