"""Command line: ``sdcpp-py demo | generate | download | info`` (also ``python -m sdcpp_py``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

DEMO_PROMPT = "a lighthouse on a rocky coast at dawn, oil painting"


def default_cache_dir() -> Path:
    base = os.environ.get("SDCPP_PY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdcpp_py")
    return Path(base)


def _add_generation_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-p", "--prompt", default=DEMO_PROMPT)
    ap.add_argument("-n", "--negative-prompt", default="")
    ap.add_argument("-W", "--width", type=int)
    ap.add_argument("-H", "--height", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg-scale", type=float)
    ap.add_argument("--sampler")
    ap.add_argument("--scheduler")
    ap.add_argument("-s", "--seed", type=int, help="default: a random 63-bit seed (printed)")
    ap.add_argument("-b", "--batch-count", type=int, default=1)
    ap.add_argument("-t", "--threads", type=int)
    ap.add_argument("--type", dest="wtype", help="convert all weights at load, e.g. f16")
    ap.add_argument("--upcast", default="auto", choices=["auto", "none", "diffusion", "all"],
                    help="expand quantized weights at load (default auto: types without a fast CPU kernel, "
                         "where the machine's memory allows)")
    ap.add_argument("--upcast-type", default="auto", choices=["auto", "f16", "bf16"],
                    help="what upcast expands to (auto: BF16 where the CPU has native BF16, else F16)")
    ap.add_argument("--repack", default="auto", choices=["auto", "none"],
                    help="CPU: Q4_0/Q4_K/IQ4_NL matmul weights in ggml's repacked kernels' layout")
    ap.add_argument("--flash-attn", action="store_true",
                    help="flash attention (CPU: faster at small sizes, slower from ~512x512)")
    ap.add_argument("-o", "--output", type=Path, default=Path("output.png"))


def _run(pipe_kwargs: dict, args: argparse.Namespace) -> int:
    from .pipeline import Pipeline
    from .settings import ContextSettings

    settings = {"wtype": args.wtype, "upcast": args.upcast, "upcast_type": args.upcast_type,
                "repack": args.repack, "flash_attn": args.flash_attn}
    if args.threads:
        settings["n_threads"] = args.threads
    start = time.perf_counter()
    with Pipeline(settings=ContextSettings(**settings), **pipe_kwargs) as pipe:
        result = pipe.generate(args.prompt, negative_prompt=args.negative_prompt, width=args.width,
                               height=args.height, steps=args.steps, cfg_scale=args.cfg_scale,
                               sampler=args.sampler, scheduler=args.scheduler, seed=args.seed,
                               batch_count=args.batch_count)
        load_s, upcast = pipe.load_seconds, pipe.upcast
    outputs = []
    for i, (image, _seed) in enumerate(zip(result.images, result.seeds, strict=False)):
        out = args.output if len(result.images) == 1 else args.output.with_stem(f"{args.output.stem}-{i}")
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        outputs.append(str(out))
    print(json.dumps({"outputs": outputs, "seeds": result.seeds, "settings": result.settings.to_dict(),
                      "upcast": list(upcast.components), "weights": result.weights, "load_s": round(load_s, 3),
                      "generate_s": round(result.timings["generate_s"], 3),
                      "total_s": round(time.perf_counter() - start, 3)}, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .synthetic import write_model_set

    models = write_model_set(args.family, args.cache / "synthetic", size=args.size, seed=0)
    args.width = args.width or 256
    args.height = args.height or 256
    args.steps = args.steps or 4
    return _run({"diffusion_model": models.diffusion_model, "llm": models.llm, "vae": models.vae}, args)


def cmd_generate(args: argparse.Namespace) -> int:
    kwargs = {"model": args.model, "diffusion_model": args.diffusion_model, "llm": args.llm,
              "vae": args.vae, "preset": args.preset}
    return _run(kwargs, args)


def cmd_download(args: argparse.Namespace) -> int:
    from .presets import download

    paths = download(args.preset, quant=args.quant, llm_quant=args.llm_quant)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .system import system_info

    print(json.dumps(system_info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sdcpp-py", description="stable-diffusion.cpp in-process")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="-v: info, -vv: engine debug log")
    sub = ap.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate with a synthetic model the package writes (no download)")
    demo.add_argument("--family", default="z-image-turbo", choices=["z-image-turbo", "flux2-klein"])
    demo.add_argument("--size", default="tiny", choices=["tiny", "full"])
    demo.add_argument("--cache", type=Path, default=default_cache_dir())
    _add_generation_args(demo)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate with model files")
    gen.add_argument("--model", help="single-file model")
    gen.add_argument("--diffusion-model")
    gen.add_argument("--llm")
    gen.add_argument("--vae")
    gen.add_argument("--preset", help="z-image-turbo | flux2-klein-4b (default: by detected family)")
    _add_generation_args(gen)
    gen.set_defaults(func=cmd_generate)

    dl = sub.add_parser("download", help="fetch a preset's real weights from the Hugging Face hub")
    dl.add_argument("preset")
    dl.add_argument("--quant", help="diffusion model quantisation, e.g. Q8_0, Q4_K, Q2_K")
    dl.add_argument("--llm-quant", default="Q4_K_M")
    dl.set_defaults(func=cmd_download)

    info = sub.add_parser("info", help="versions, library and CPU features")
    info.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose >= 2:
        logging.getLogger("sdcpp_py.native").setLevel(logging.DEBUG)
    elif args.verbose == 0:
        logging.getLogger("sdcpp_py.native").setLevel(logging.WARNING)
    from .errors import SdcppError

    try:
        return args.func(args)
    except SdcppError as e:
        print(f"sdcpp-py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
