"""sd-cli's img_gen mode in one resident process: load once, encode each prompt once.

Every image is encode -> denoise -> decode through the Pipeline's staged calls (the
same pixels as one-shot ``generate``, which is sd-cli's path), so N prompts x M seeds
cost one load, N encodings and N x M samplings. Each image is written as soon as it
is decoded, with its settings in the PNG; Ctrl-C stops the running step and exits
130, keeping what was written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import Preview
from .._images import open_image, size_of
from ..controlnet import canny
from ..fileid import file_hash, write_whole
from ..metadata import ImageParameters, image_bytes, image_parameters, read_parameters
from ..modelset import model_set
from ..pipeline import Pipeline
from ..settings import TqdmProgress, parse_request
from ..upscaler import Upscaler
from .jobs import Job, OutputNames, make_jobs, parse_seeds, read_prompt_file
from .sdcli import (
    PER_JOB,
    SD_CLI_DEFAULT_SEED,
    CliError,
    context_settings,
    extract_loras,
    hires_upscaler,
    model_files,
    request_flags,
)

logger = logging.getLogger("sdcpp_py.cli")


class StepBars(TqdmProgress):
    """A tqdm bar per image (steps, seconds per step, ETA; on stderr)."""

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__(file=sys.stderr)
        self.total, self.enabled, self.index = total, enabled, 1

    def next_image(self) -> None:
        self.close()
        self.index += 1

    def __call__(self, step: int, steps: int, seconds: float) -> None:
        if self.enabled:
            self.desc = f"image {self.index}/{self.total}"
            super().__call__(step, steps, seconds)


def _jobs(args: argparse.Namespace, stored: ImageParameters | None) -> list[Job]:
    default_seed = stored.settings.seed if stored is not None else SD_CLI_DEFAULT_SEED
    seeds = parse_seeds(args.seeds, args.seed_range, args.seed, args.batch_count, default_seed)
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise CliError("give -p/--prompt or --prompt-file, not both")
        lines = read_prompt_file(args.prompt_file)
    else:
        prompt = args.prompt if args.prompt is not None else (stored.settings.prompt if stored else None)
        if prompt is None:
            raise CliError("the following arguments are required: -p/--prompt (or --prompt-file)")
        lines = [{"prompt": prompt}]
    negative = args.negative_prompt if args.negative_prompt is not None else (
        stored.settings.negative_prompt if stored else "")
    # the flags' request fields, the stored image's settings filling what they leave unset
    stored_settings = {k: v for k, v in stored.settings.to_dict().items() if k not in PER_JOB} if stored else {}
    base = {**parse_request(stored_settings), **request_flags(args)}
    if "hires_upscaler" in base:
        base["hires_upscaler"] = hires_upscaler(base["hires_upscaler"], args.hires_upscalers_dir)
    jobs = make_jobs(lines, seeds, negative, args.init_img, list(args.ref_image), args.mask)
    for job in jobs:
        job.overrides = {**base, **job.overrides}
        job.prompt, tagged = extract_loras(job.prompt, args.lora_model_dir)    # sd-cli's <lora:NAME:WEIGHT>
        if tagged:
            job.overrides["loras"] = (*job.overrides.get("loras", ()), *tagged)
    return jobs


def run(args: argparse.Namespace) -> int:
    stored = read_parameters(args.from_png) if args.from_png is not None else None
    if stored is not None and stored.source == "sdcpp_py":
        logger.info("regenerating %s: %s", args.from_png, stored.models)
    jobs = _jobs(args, stored)
    if stored is not None and "controlnet" in stored.models and args.control_image is None:
        raise CliError(f"{args.from_png} was made with the ControlNet {stored.models['controlnet']} and a control "
                       "image, which the metadata does not hold: give --control-net and --control-image")
    if args.control_image is None and args.canny:
        raise CliError("--canny preprocesses the control image: give --control-image")
    if args.control_image is not None and not args.controlnet:
        raise CliError("--control-image needs a ControlNet: --control-net FILE")
    control_source = open_image(args.control_image, "--control-image") if args.control_image else None
    if not (args.model or args.diffusion_model):
        hint = f" (the image was made with {stored.models})" if stored is not None else ""
        raise CliError(f"give the model files: --diffusion-model (with --llm, --vae) or -m{hint}")
    settings = {**context_settings(args, stored.context if stored else None),
                "tae_preview_only": args.taesd_preview_only}
    if _encoder_done_after_first(jobs, args, settings):
        settings["release_encoder"] = True
    models = model_set("", {**model_files(args), "preset": args.preset, "settings": settings})
    total = sum(len(j.seeds) for j in jobs)
    names = OutputNames(args.output, total, args.output_begin_idx, args.allow_output_outside)
    summary: dict[str, Any] = {"outputs": [], "seeds": [], "prompts": len(jobs)}
    start = time.perf_counter()
    preview = _preview(args)
    pipe: Pipeline | None = None
    upscaler: Upscaler | None = None
    try:
        pipe, _ = Pipeline.open_set(models)
        upscaler = (Upscaler(args.upscale_model, n_threads=pipe.settings.n_threads, tile_size=args.upscale_tile_size)
                    if args.upscale_model is not None else None)
        if stored is not None and stored.hashes and not args.disable_image_metadata:
            _check_hashes(pipe, stored)
        weights = pipe.weights
        bars = StepBars(total, enabled=not args.no_progress)
        index = 0
        for job in jobs:
            init = open_image(job.init_img, "--init-img") if job.init_img else None
            mask = open_image(job.mask, "--mask", "L") if job.mask else None
            refs = [open_image(r, "--ref-image") for r in job.ref_images]
            overrides = dict(job.overrides)
            source = init or (refs[0] if refs else None) or control_source
            if source is not None and "width" not in overrides and "height" not in overrides:
                # sd-cli: the size of the init image (else the first reference), in multiples of 16
                overrides["width"], overrides["height"] = size_of(source)
            s = pipe.settings_for(job.prompt, negative_prompt=job.negative_prompt, seed=job.seeds[0], **overrides)
            # -s/-b encode an init image once with the first seed (sd-cli's batch); --seeds and
            # --seed-range make each image as generate(seed=...) makes it, so one seed at a time
            per_seed = init is not None and (args.seeds is not None or args.seed_range is not None)
            groups = [[seed] for seed in job.seeds] if per_seed else [job.seeds]
            control = _control_image(control_source, s.width, s.height, args.canny)
            for seeds in groups:
                items = pipe.images(s, seeds=seeds, init_image=init, ref_images=refs, mask=mask,
                                    control_image=control, progress=bars, preview=preview)
                for item in items:
                    bars.close()
                    path = names.name(index, job, item.seed, item.settings)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    params = (None if args.disable_image_metadata
                              else image_parameters(pipe, item.settings, item.seed, weights,
                                                    control=control is not None))
                    image = upscaler.upscale(item.image, args.upscale_repeats) if upscaler else item.image
                    write_whole(path, image_bytes(image, path.suffix, params))   # whole: Ctrl-C leaves none half
                    logger.info("save result image %d to '%s' (denoise %.2f s, decode %.2f s)", index, path,
                                item.timings["denoise_s"], item.timings["decode_s"])
                    summary["outputs"].append(str(path))
                    summary["seeds"].append(item.seed)
                    index += 1
                    bars.next_image()
        bars.close()
    except KeyboardInterrupt:
        print(f"sdcpp-py: interrupted; {len(summary['outputs'])} of {total} images written", file=sys.stderr)
        return 130
    finally:
        if upscaler is not None:
            upscaler.close()
        if pipe is not None:
            summary.update({"loads": pipe.load_count, "encodes": pipe.encodings.info().misses,
                            "encoder_loaded": pipe.encoder_loaded,
                            "load_s": round(pipe.load_seconds, 3), "weights": pipe.weight_plan.to_dict()})
            pipe.close()
        summary["total_s"] = round(time.perf_counter() - start, 3)
        print(json.dumps(summary, indent=2))
    return 0


def _encoder_done_after_first(jobs: list[Any], args: argparse.Namespace, settings: dict[str, Any]) -> bool:
    """True when the run encodes one prompt (with one negative prompt) only: its encoding is
    cached for every seed, so the text encoder can go once it is done (sd-cli frees each model
    once used), unless --keep-encoder; LoRAs merged into the weights forbid releasing."""
    if args.keep_encoder or settings.get("lora_apply_mode") == "immediately":
        return False
    return len({(job.prompt, job.negative_prompt) for job in jobs}) == 1


def _control_image(image: Image.Image | None, width: int, height: int, edges: bool) -> Image.Image | None:
    """sd-cli's control image: resized to the image's size, then (--canny) its edges."""
    if image is None:
        return None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return canny(image) if edges else image


def _preview(args: argparse.Namespace) -> Preview | None:
    if args.preview == "none":
        return None
    path = Path(args.preview_path)

    def write(step: int, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, image_bytes(Image.fromarray(image), path.suffix))

    return Preview(write, mode=args.preview, interval=args.preview_interval, noisy=args.preview_noisy)


def _check_hashes(pipe: Pipeline, stored: ImageParameters) -> None:
    for role, digest in stored.hashes.items():
        p = pipe.paths.get(role)
        if p is not None and file_hash(p) != digest:
            logger.warning("%s %s differs from the file the image was made with (hash %s, now %s)",
                           role, p.name, digest, file_hash(p))
