"""``sdcpp-py serve``: the model flags of the command line (or ``--config FILE``) plus the server's."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

from .sdcli import CliError, build_parser, context_settings, model_files, parse

logger = logging.getLogger("sdcpp_py.server")


def serve_parser() -> argparse.ArgumentParser:
    ap = build_parser("sdcpp-py serve")
    ap.description = ("Serve resident models over HTTP: OpenAI's /v1/images/generations and /edits, "
                      "/v1/jobs with server-sent events, /v1/models, /health, /metrics. Model flags as for "
                      "sdcpp-py itself (generation flags are ignored: requests carry their settings).")
    g = ap.add_argument_group("Server Options")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8080, help="port (0: a free one, printed)")
    g.add_argument("--api-key", help="require Authorization: Bearer KEY (visible to local users in `ps`: "
                                      "prefer $SDCPP_PY_API_KEY or --api-key-file)")
    g.add_argument("--api-key-file", type=Path, help="read the API key from this file (first line)")
    g.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (anyone who reaches it can use it)")
    g.add_argument("--config", type=Path, help="JSON file with several model sets and limits")
    g.add_argument("--name", help="the model's name at /v1/models (default: its preset)")
    g.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)")
    g.add_argument("--max-n", type=int, help="images per request (default 8)")
    g.add_argument("--max-pixels", type=int, help="width x height per image (default 1536*1536)")
    g.add_argument("--max-steps", type=int, help="steps per image (default 50)")
    g.add_argument("--max-queue", type=int, help="queued jobs before 429 (default 16)")
    g.add_argument("--result-ttl", type=float, help="seconds a finished job is kept (default 600)")
    g.add_argument("--max-body-mb", type=float, help="request body size in MB (default 32)")
    g.add_argument("--max-requests", type=int, help="stop after this many requests (tests)")
    g.add_argument("--max-seconds", type=float, help="stop after this many seconds (tests)")
    return ap


def serve_command(argv: list[str]) -> int:
    from ..server import Limits, ServerConfig, load_config, model_set, serve

    args = parse(argv, serve_parser())
    if args.config is not None:
        if args.model or args.diffusion_model:
            raise CliError("give the model flags or --config, not both")
        entries, limits = load_config(args.config)
    else:
        if not (args.model or args.diffusion_model):
            raise CliError("give the model files (--diffusion-model, --llm, --vae, or -m) or --config FILE")
        entries = [model_set(args.name or "", {**model_files(args), "settings": context_settings(args),
                                               "preset": args.preset})]
        limits = Limits()
    overrides = {"max_n": args.max_n, "max_pixels": args.max_pixels, "max_steps": args.max_steps,
                 "max_queue": args.max_queue, "result_ttl_s": args.result_ttl,
                 "max_body_bytes": int(args.max_body_mb * (1 << 20)) if args.max_body_mb is not None else None}
    limits = Limits(**{**limits.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    key = _api_key(args)
    if not _loopback(args.host) and key is None:
        if not args.insecure:
            raise CliError(f"--host {args.host} is reachable from other machines: give an API key "
                           "($SDCPP_PY_API_KEY or --api-key-file), or --insecure to serve without one")
        logger.warning("serving on %s without an API key (--insecure): anyone who reaches it can use it", args.host)
    if args.lora_model_dir is not None and not args.lora_model_dir.is_dir():
        raise CliError(f"--lora-model-dir {args.lora_model_dir}: no such folder")
    config = ServerConfig(tuple(entries), limits, key, tuple(args.cors_origin),
                          args.lora_model_dir.resolve() if args.lora_model_dir else None)
    return serve(config, host=args.host, port=args.port, max_requests=args.max_requests,
                 max_seconds=args.max_seconds, log_level="info" if args.verbose else "warning")


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, --api-key or $SDCPP_PY_API_KEY (None: no auth); an empty one is
    an error, not a server without auth."""
    sources = [("--api-key-file", args.api_key_file), ("--api-key", args.api_key),
               ("$SDCPP_PY_API_KEY", os.environ.get("SDCPP_PY_API_KEY"))]
    given = [(name, v) for name, v in sources if v is not None]
    if not given:
        return None
    name, value = given[0]
    if isinstance(value, Path):
        try:
            value = (value.read_text(encoding="utf-8").splitlines() or [""])[0]
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--api-key-file: {e}") from None
    if not value.strip():
        raise CliError(f"{name} is empty: that would serve without auth (leave it unset for that)")
    if name == "--api-key":
        logger.warning("--api-key is visible to every local user (ps): prefer $SDCPP_PY_API_KEY or --api-key-file")
    return str(value).strip()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
