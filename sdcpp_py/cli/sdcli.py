"""sd-cli's command line: its flags, spelled and grouped as sd-cli spells and groups them.

Flags sd-cli has and the engine behind us supports map onto Pipeline, ContextSettings
and GenerationSettings; sd-cli flags we do not support are known by name and refused
with a one-line error (exit 2), as are flags sd-cli does not have. Defaults for what
a command does not give follow the model's preset (steps, cfg, size), except the seed:
42, as in sd-cli.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..modelset import MODEL_FILES
from ..settings import ESRGAN_SUFFIXES, HIRES_UPSCALERS, parse_request, request_fields

SD_CLI_DEFAULT_SEED = 42

# sd-cli flags we know and refuse, and why (for Z-Image and FLUX.2 Klein, in this engine).
_OTHER_ENCODERS = "an encoder of other model families (Z-Image and FLUX.2 Klein use Qwen3 alone)"
_VIDEO = "video generation (Wan): out of scope"
_SD_ONLY = "an SD-family option with no effect on these models"
_NOT_YET = "not offered yet: the engine runs it, sdcpp-py does not pass it on"
REFUSED: dict[str, str] = {
    **dict.fromkeys(("--clip_l", "--clip_g", "--clip_vision", "--t5xxl", "--llm_vision", "--qwen2vl_vision"),
                    _OTHER_ENCODERS),
    **dict.fromkeys(("--high-noise-diffusion-model", "--end-img", "--control-video", "--high-noise-steps",
                     "--video-frames", "--fps", "--high-noise-cfg-scale", "--high-noise-img-cfg-scale",
                     "--high-noise-guidance", "--high-noise-slg-scale", "--high-noise-skip-layer-start",
                     "--high-noise-skip-layer-end", "--high-noise-eta", "--moe-boundary", "--vace-strength",
                     "--high-noise-sampling-method", "--high-noise-skip-layers"), _VIDEO),
    "--control-net-cpu": "the Z-Image ControlNet runs inside the DiT's graph, on the DiT's device",
    **dict.fromkeys(("--photo-maker", "--pm-id-images-dir", "--pm-id-embed-path", "--pm-style-strength"),
                    "PhotoMaker is SDXL-only"),
    **dict.fromkeys(("--chroma-t5-mask-pad", "--chroma-disable-dit-mask", "--chroma-enable-t5-mask"),
                    "a Chroma option"),
    **dict.fromkeys(("--clip-skip", "--embd-dir", "--force-sdxl-vae-conv-scale", "--img-cfg-scale",
                     "--qwen-image-zero-cond-t", "--prediction"), _SD_ONLY),
    "--timestep-shift": "a shifted timestep is SDXL-only in this engine (it is reset to 0 for flow models)",
    "--increase-ref-index": "FLUX.2 gives each reference its own index already; Z-Image takes no references",
    **dict.fromkeys(("--max-vram", "--metadata-raw", "--metadata-brief", "--metadata-all"), _NOT_YET),
}
UNSUPPORTED = tuple(REFUSED)
MODES = ("img_gen", "convert", "metadata", "upscale")
UNSUPPORTED_MODES = ("vid_gen",)


class CliError(Exception):
    """A command line we refuse (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, naming the flag (argparse would print the usage first)."""
        raise CliError(message)


def _csv_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None


def build_parser(prog: str = "sdcpp-py") -> argparse.ArgumentParser:
    ap = _Parser(prog=prog, allow_abbrev=False, add_help=False, usage="%(prog)s [options]",
                 description="stable-diffusion.cpp in-process, with sd-cli's command line. Subcommands: "
                             "demo, info [IMAGE.png], download, convert (`sdcpp-py SUBCOMMAND --help`).")
    cli = ap.add_argument_group("CLI Options")
    cli.add_argument("-o", "--output", default="output.png",
                     help="path to write result image to; printf-style %%d for image sequences (output_%%03d.png); "
                          "our addition: a template with {index}, {prompt_index}, {seed}, {steps}, {width}, "
                          "{height}, {slug} (default: ./output.png, ./output.gguf for convert)")
    cli.add_argument("--image", help="path to the image to inspect (for metadata mode)")
    cli.add_argument("--metadata-format", choices=("text", "json"), default="text",
                     help="metadata output format (default: text)")
    cli.add_argument("--preview-path", default="preview.png", help="path to write preview image to")
    cli.add_argument("--preview-interval", type=int, default=1,
                     help="interval in denoising steps between preview updates (default 1)")
    cli.add_argument("--output-begin-idx", type=int, default=-1,
                     help="starting index for output image sequence (default 0)")
    cli.add_argument("--convert-name", action="store_true", help="convert tensor names (for convert mode)")
    cli.add_argument("-v", "--verbose", action="count", default=0, help="print extra info (-vv: engine debug log)")
    cli.add_argument("--color", action="store_true", help="accepted for sd-cli compatibility (no effect)")
    cli.add_argument("--taesd-preview-only", action="store_true",
                     help="use taesd for previews only, not for the final image")
    cli.add_argument("--preview-noisy", action="store_true", help="preview the noisy inputs, not the denoised")
    cli.add_argument("-M", "--mode", default="img_gen", help="run mode, one of [img_gen, convert, metadata]")
    cli.add_argument("--preview", default="none", choices=("none", "proj", "tae", "vae"),
                     help="preview method (default none)")
    cli.add_argument("-h", "--help", action="help", help="show this help message and exit")

    ctx = ap.add_argument_group("Context Options")
    ctx.add_argument("-m", "--model", help="path to full model")
    ctx.add_argument("--llm", "--qwen2vl", dest="llm", help="path to the llm text encoder (Qwen3 for these models)")
    ctx.add_argument("--diffusion-model", help="path to the standalone diffusion model")
    ctx.add_argument("--vae", help="path to standalone vae model")
    ctx.add_argument("--taesd", "--tae", dest="taesd", help="path to taesd (tiny autoencoder: fast, low quality)")
    ctx.add_argument("--control-net", dest="controlnet",
                     help="path to a Z-Image-Turbo Fun ControlNet Union file (1.0, 2.0, 2.1; safetensors or GGUF)")
    ctx.add_argument("--tensor-type-rules", help='weight type per tensor pattern (example: "^vae\\.=f16")')
    ctx.add_argument("-t", "--threads", type=int, default=-1,
                     help="number of threads (default -1: the physical cores)")
    ctx.add_argument("--offload-to-cpu", action="store_true", help="weights in RAM, loaded to VRAM when needed")
    ctx.add_argument("--mmap", action="store_true", help="memory-map the model files")
    ctx.add_argument("--circular", action="store_true", help="seamless across both pairs of edges")
    ctx.add_argument("--circularx", action="store_true", help="seamless across the left/right edges")
    ctx.add_argument("--circulary", action="store_true", help="seamless across the top/bottom edges")
    ctx.add_argument("--lora-model-dir", type=Path,
                     help="folder of the LoRA files a prompt's <lora:NAME:WEIGHT> names (default: .)")
    ctx.add_argument("--upscale-model", type=Path, help="an ESRGAN model (RealESRGAN x4plus, ...): -M upscale, or "
                                                        "applied to every generated image")
    ctx.add_argument("--upscale-repeats", type=int, default=1, help="times to run the upscaler (default 1)")
    ctx.add_argument("--upscale-tile-size", type=int, default=128, help="the upscaler's tile size (default 128)")
    ctx.add_argument("--hires-upscalers-dir", type=Path, help="folder of the ESRGAN files --hires-upscaler names")
    ctx.add_argument("--lora-apply-mode", choices=("auto", "immediately", "at_runtime"),
                     help="auto (here: at_runtime, the base weights untouched) | at_runtime | immediately "
                          "(merged into the weights; needs --repack none)")
    ctx.add_argument("--clip-on-cpu", action="store_true", help="keep the text encoder on the CPU")
    ctx.add_argument("--vae-on-cpu", action="store_true", help="keep the VAE on the CPU")
    ctx.add_argument("--fa", action="store_true", help="use flash attention")
    ctx.add_argument("--diffusion-fa", action="store_true", help="flash attention in the diffusion model only")
    ctx.add_argument("--diffusion-conv-direct", action="store_true", help="ggml_conv2d_direct in the diffusion model")
    ctx.add_argument("--vae-conv-direct", action="store_true", help="ggml_conv2d_direct in the VAE")
    ctx.add_argument("--type", dest="wtype",
                     help="weight type (f32, f16, bf16, q8_0, q4_0, q4_K, ...; default: the file's types)")
    ctx.add_argument("--rng", help="RNG, one of [std_default, cuda, cpu] (default cuda)")
    ctx.add_argument("--sampler-rng", help="sampler RNG (default: --rng)")

    gen = ap.add_argument_group("Generation Options")
    gen.add_argument("-p", "--prompt", help="the prompt to render")
    gen.add_argument("-n", "--negative-prompt", help='the negative prompt (default: "")')
    gen.add_argument("-i", "--init-img", help="path to the init image (img2img)")
    gen.add_argument("--mask", help="path to the inpainting mask (white: regenerate; the init image's size)")
    gen.add_argument("--control-image", help="path to the control image (Z-Image ControlNet Union; resized to the "
                                             "image's size)")
    gen.add_argument("--control-strength", type=float, help="how strongly the control image guides (default 0.9)")
    gen.add_argument("--canny", action="store_true", help="apply the Canny preprocessor (edge detection) to the "
                                                          "control image")
    gen.add_argument("-H", "--height", type=int, help="image height (default: the preset's)")
    gen.add_argument("-W", "--width", type=int, help="image width (default: the preset's)")
    gen.add_argument("--steps", type=int, help="number of sample steps (default: the preset's)")
    gen.add_argument("-b", "--batch-count", type=int, default=1, help="batch count")
    gen.add_argument("--cfg-scale", type=float, help="unconditional guidance scale (default: the preset's)")
    gen.add_argument("--guidance", type=float, help="distilled guidance scale")
    gen.add_argument("--flow-shift", type=float, help="shift value for flow models (default: auto)")
    gen.add_argument("--strength", type=float, help="strength for noising/unnoising (default 0.75)")
    gen.add_argument("--disable-image-metadata", action="store_true", help="no generation metadata in the PNG")
    gen.add_argument("--vae-tiling", action="store_true", default=None,
                     help="process the VAE in tiles to reduce memory")
    gen.add_argument("-s", "--seed", type=int,
                     help="RNG seed (default 42, random for < 0)")
    gen.add_argument("--sampling-method", dest="sampler", metavar="SAMPLING_METHOD",
                     help="sampling method (euler, euler_a, heun, dpm++2m, ...)")
    gen.add_argument("--scheduler", help="denoiser sigma scheduler (discrete, karras, simple, ...)")
    gen.add_argument("--sigmas", type=_csv_floats, help='custom sigmas, comma-separated ("1.0,0.5,0.0")')
    gen.add_argument("--eta", type=float, help="eta of the ancestral samplers (default: the engine's)")
    gen.add_argument("--skip-layers", help='skip-layer guidance: the blocks to skip, e.g. "[7,8,9]" (FLUX.2)')
    gen.add_argument("--slg-scale", type=float, help="skip-layer guidance scale (default 0: off)")
    gen.add_argument("--skip-layer-start", type=float, help="skip-layer guidance starts (default 0.01)")
    gen.add_argument("--skip-layer-end", type=float, help="skip-layer guidance ends (default 0.2)")
    gen.add_argument("--vae-tile-size", help="VAE tile size in latent cells, WxH (with --vae-tiling)")
    gen.add_argument("--vae-tile-overlap", type=float, help="VAE tile overlap, a fraction of a tile (default 0.5)")
    gen.add_argument("--vae-relative-tile-size", help="VAE tile size as a fraction of the latent, WxH")
    gen.add_argument("--disable-auto-resize-ref-image", dest="auto_resize_ref_image", action="store_false",
                     default=None, help="use reference images at their own size (sides: multiples of 16)")
    gen.add_argument("--cache-mode", choices=("easycache", "ucache", "dbcache", "taylorseer", "cache-dit", "spectrum"),
                     help="step cache: easycache, dbcache/taylorseer/cache-dit (DiT blocks), spectrum")
    gen.add_argument("--cache-option", dest="cache_options",
                     help='the cache\'s options, "key=value,..." (easycache: threshold, start, end, decay, relative, '
                          "reset; dbcache/taylorseer/cache-dit: Fn, Bn, threshold, warmup; spectrum: w, m, lam, "
                          "window, flex, warmup, stop)")
    gen.add_argument("--scm-mask", help='cache-dit steps mask, "1,1,0,..." (1: compute, 0: may cache)')
    gen.add_argument("--scm-policy", choices=("dynamic", "static"), help="SCM policy (default dynamic)")
    gen.add_argument("--hires", action="store_true", default=None, help="hires fix: a second pass at a larger size")
    gen.add_argument("--hires-upscaler", help="Latent (default), Latent (nearest|nearest-exact|antialiased|bicubic|"
                                              "bicubic antialiased), Lanczos, Nearest, or an ESRGAN model's name in "
                                              "--hires-upscalers-dir")
    gen.add_argument("--hires-scale", type=float, help="the second pass's size factor (default 2)")
    gen.add_argument("--hires-width", type=int, help="the second pass's width (0: --hires-scale)")
    gen.add_argument("--hires-height", type=int, help="the second pass's height (0: --hires-scale)")
    gen.add_argument("--hires-steps", type=int, help="the second pass's steps (0: --steps)")
    gen.add_argument("--hires-denoising-strength", type=float, help="the second pass's strength (default 0.7)")
    gen.add_argument("--hires-upscale-tile-size", type=int, help="an ESRGAN upscaler's tile size (default 128)")
    gen.add_argument("-r", "--ref-image", action="append", default=[],
                     help="reference image (FLUX.2 editing; can be used multiple times)")

    ours = ap.add_argument_group("sdcpp-py Options (not sd-cli's)")
    ours.add_argument("--preset", help="z-image-turbo | flux2-klein-4b (default: by detected family)")
    ours.add_argument("--upcast", choices=("auto", "none", "diffusion", "all"),
                      help="expand quantized weights at load (auto: the weight policy; none: as stored, as sd-cli)")
    ours.add_argument("--upcast-type", choices=("auto", "f16", "bf16"),
                      help="what upcast expands to (auto: BF16 where the CPU has native BF16)")
    ours.add_argument("--repack", choices=("auto", "none"),
                      help="CPU: Q4_0/Q4_K/IQ4_NL matmul weights in ggml's repacked layout (auto)")
    ours.add_argument("--vae-weights", choices=("f16", "bf16"),
                      help="the VAE's convolution weights: f16 (default, as sd-cli) or bf16 (CPU: BF16 matmuls, "
                           "faster where the CPU has AVX512-BF16)")
    ours.add_argument("--f32-attention", action="store_true",
                      help="attention in F32 (K.Q matrix) or F16 flash attention, as upstream, where the CPU "
                           "module has AVX512-BF16 (default there: BF16 flash tiles, 2.4-4.3x faster)")
    ours.add_argument("--backend", default="auto", choices=("auto", "cpu", "vulkan"), help="compute backend")
    ours.add_argument("--device", help="Vulkan device index or name")
    ours.add_argument("--prompt-file", type=Path,
                      help="one prompt per line, or JSON lines with per-line settings; models load once, "
                           "each prompt is encoded once")
    ours.add_argument("--allow-output-outside", action="store_true",
                      help="let a prompt file's \"output\" leave -o's folder (absolute paths, ..)")
    ours.add_argument("--seeds", help="comma-separated seeds: every prompt with each (1,2,3)")
    ours.add_argument("--seed-range", help="seeds A to B inclusive (A:B)")
    ours.add_argument("--from-png", type=Path, help="regenerate an image from its metadata (flags override)")
    ours.add_argument("--keep-encoder", action="store_true",
                      help="keep the text encoder loaded after encoding (a run with one prompt frees it once the "
                           "prompt is encoded, as sd-cli frees each model once used: ~2.5 GB less for Qwen3-4B "
                           "Q4_K_M while the image is denoised and decoded)")
    ours.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def parse(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse sd-cli's command line; CliError for refused flags and values."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in REFUSED:
            raise CliError(f"{flag}: an sd-cli flag that sdcpp-py refuses: {REFUSED[flag]}")
    args = (parser or build_parser()).parse_args(argv)
    if args.mode in UNSUPPORTED_MODES:
        raise CliError(f"-M {args.mode}: an sd-cli mode that sdcpp-py does not support")
    if args.mode not in MODES:
        raise CliError(f"-M {args.mode}: run mode must be one of {', '.join(MODES)}")
    if args.preview_interval < 1:
        raise CliError("--preview-interval must be >= 1")
    if args.batch_count < 1:
        raise CliError("--batch-count must be >= 1")
    return args


# request fields a command line sets per prompt or per image, not as a flag of the run
PER_JOB = ("prompt", "negative_prompt", "seed", "batch_count")


def request_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the flags set (every flag whose dest is a request field; PER_JOB aside)."""
    given = {k: getattr(args, k) for k in request_fields() if k not in PER_JOB and hasattr(args, k)}
    return parse_request(given, where="flags", text=True)


def model_files(args: argparse.Namespace) -> dict[str, str]:
    """The model files the flags name, as absolute paths."""
    return {k: str(Path(v).expanduser().resolve()) for k in MODEL_FILES if (v := getattr(args, k, None))}


def context_settings(args: argparse.Namespace, stored: dict[str, Any] | None = None) -> dict[str, Any]:
    """ContextSettings keywords for the parsed flags; ``stored`` (an image's metadata context)
    fills what the flags leave unset."""
    stored = stored or {}
    device: int | str | None = args.device
    if isinstance(device, str) and device.isdigit():
        device = int(device)
    picked = {"wtype": args.wtype, "upcast": args.upcast, "upcast_type": args.upcast_type, "repack": args.repack,
              "tensor_type_rules": args.tensor_type_rules, "rng": args.rng, "sampler_rng": args.sampler_rng,
              "lora_apply_mode": args.lora_apply_mode, "vae_weights": args.vae_weights}
    out: dict[str, Any] = {k: v if v is not None else stored.get(k) for k, v in picked.items()}
    for k, default in (("upcast", "auto"), ("upcast_type", "auto"), ("repack", "auto"), ("rng", "cuda"),
                       ("lora_apply_mode", "auto"), ("vae_weights", "f16")):
        out[k] = out[k] or default
    flags = {"flash_attn": args.fa, "diffusion_flash_attn": args.diffusion_fa, "vae_conv_direct": args.vae_conv_direct,
             "diffusion_conv_direct": args.diffusion_conv_direct}
    out.update({k: bool(v or stored.get(k)) for k, v in flags.items()})
    # parameters without the setting (sd-cli's images) take the engine's default, as sd-cli does
    out["bf16_attention"] = not args.f32_attention and stored.get("bf16_attention", True) is not False
    out.update({"circular_x": bool(args.circular or args.circularx or stored.get("circular_x")),
                "circular_y": bool(args.circular or args.circulary or stored.get("circular_y"))})
    out.update({"enable_mmap": args.mmap, "offload_params_to_cpu": args.offload_to_cpu,
                "keep_clip_on_cpu": args.clip_on_cpu, "keep_vae_on_cpu": args.vae_on_cpu,
                "backend": args.backend, "device": device})
    if args.threads > 0:
        out["n_threads"] = args.threads
    return out


LORA_TAG = re.compile(r"<lora:([^:>]+):([^>]+)>")
LORA_SUFFIXES = (".safetensors", ".gguf", ".ckpt", ".pt")


def extract_loras(prompt: str, folder: Path | None) -> tuple[str, list[tuple[str, float]]]:
    """sd-cli's prompt syntax: every ``<lora:NAME:WEIGHT>`` taken out of the prompt, NAME found in
    ``folder`` (with or without its suffix)."""
    loras = []
    for name, weight in LORA_TAG.findall(prompt):
        base = (folder or Path(".")) / name
        found = next((p for p in (base, *(base.with_name(base.name + s) for s in LORA_SUFFIXES)) if p.is_file()),
                     None)
        if found is None:
            raise CliError(f"<lora:{name}:{weight}>: no {name}[{'|'.join(LORA_SUFFIXES)}] in {folder or '.'} "
                           "(--lora-model-dir)")
        try:
            loras.append((str(found.resolve()), float(weight)))
        except ValueError:
            raise CliError(f"<lora:{name}:{weight}>: the weight is not a number") from None
    return LORA_TAG.sub("", prompt), loras


def hires_upscaler(name: str, folder: Path | None) -> str:
    """An upscaler's name as the engine knows it, or an ESRGAN file found in ``folder`` (sd-cli's rule)."""
    if name.lower() in (n.lower() for n in HIRES_UPSCALERS) or name.lower().endswith(ESRGAN_SUFFIXES):
        return name
    base = (folder or Path(".")) / name
    found = next((p for p in (base.with_name(base.name + s) for s in ESRGAN_SUFFIXES) if p.is_file()), None)
    if found is None:
        raise CliError(f"--hires-upscaler {name}: neither an upscaler ({', '.join(HIRES_UPSCALERS)}) nor a model "
                       f"in {folder or '.'} (--hires-upscalers-dir)")
    return str(found.resolve())


def print_error(message: str) -> int:
    print(f"sdcpp-py: error: {message}", file=sys.stderr)
    return 2
