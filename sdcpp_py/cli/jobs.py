"""What one command line asks for: prompts x seeds, and the file name of each image.

A prompt file holds one prompt per line, or JSON objects (one per line) with a
``prompt`` and any of the per-image settings below; blank lines and lines starting
with ``#`` are skipped. Seeds come from ``--seeds 1,2,3``, ``--seed-range A:B``
(inclusive) or sd-cli's ``-s SEED -b COUNT`` (SEED, SEED+1, ...); a negative seed
draws a random one.

Output names follow sd-cli: a printf ``%d`` in ``-o`` numbers the images
(``--output-begin-idx``, default 0); without one, a single image takes the path
as given and several take ``NAME_0.png``, ``NAME_1.png``, ... A ``{field}``
template (our addition) can use ``index``, ``prompt_index``, ``seed``, ``steps``,
``width``, ``height`` and ``slug`` (the prompt's first words).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import settings
from ..errors import InvalidArgumentError
from ..settings import parse_request, request_fields, resolve_seed
from .sdcli import CliError

# A JSON line's keys: every request field (sd-cli's spelling of one as an alias), and the line's own.
LINE_ALIASES = {"sampling_method": "sampler"}
LINE_OWN = ("seeds", "init_img", "mask", "ref_images", "output")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_WIDTH = 64                     # a {field:>N} or %Nd width at most (a huge one allocates the string)
_PRINTF = re.compile(r"(?:[^%]|^)(?:%%)*(%\d{0,2}d)")


@dataclass
class Job:
    """One prompt and the seeds it runs with; ``overrides``: generate() keywords."""

    prompt: str
    negative_prompt: str
    seeds: list[int]
    prompt_index: int
    overrides: dict[str, Any] = field(default_factory=dict)
    init_img: str | None = None
    mask: str | None = None
    ref_images: list[str] = field(default_factory=list)
    output: str | None = None


def parse_seeds(seeds: str | None, seed_range: str | None, seed: int | None, batch_count: int,
                default: int) -> list[int]:
    """The seeds for each prompt (random ones drawn now, so they are reported and written)."""
    if seeds is not None and seed_range is not None:
        raise CliError("give --seeds or --seed-range, not both")
    if seeds is not None:
        try:
            values = [int(v) for v in seeds.split(",") if v.strip()]
        except ValueError:
            raise CliError(f"--seeds: not comma-separated integers: {seeds!r}") from None
        if not values:
            raise CliError("--seeds: no seed given")
        return [resolve_seed(v if v >= 0 else None) for v in values]
    if seed_range is not None:
        return settings.seed_range(seed_range, 100_000, "--seed-range")
    wanted = default if seed is None else seed
    first = resolve_seed(None) if wanted < 0 else resolve_seed(wanted)
    return [first + i for i in range(batch_count)]


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """The prompt file's lines as dicts with a ``prompt`` (and per-line settings)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CliError(f"--prompt-file: {e}") from None
    except UnicodeDecodeError:
        raise CliError(f"--prompt-file: {path} is not UTF-8 text") from None
    lines: list[dict[str, Any]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise CliError(f"--prompt-file line {number}: bad JSON ({e.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise CliError(f"--prompt-file line {number}: needs a \"prompt\" string")
            known = [*request_fields(), *LINE_ALIASES, *LINE_OWN]
            unknown = sorted(set(item) - set(known))
            if unknown:
                raise CliError(f"--prompt-file line {number}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
            lines.append({LINE_ALIASES.get(str(k), str(k)): v for k, v in item.items()} | {"line": number})
        else:
            lines.append({"prompt": line, "line": number})
    if not lines:
        raise CliError(f"--prompt-file: {path} holds no prompt")
    return lines


def make_jobs(lines: Sequence[dict[str, Any]], seeds: list[int], negative_prompt: str,
              init_img: str | None, ref_images: list[str], mask: str | None = None) -> list[Job]:
    jobs = []
    for i, line in enumerate(lines):
        item = dict(line)
        number = item.pop("line", i + 1)
        line_seeds = seeds
        if "seeds" in item or "seed" in item:
            raw = item.pop("seeds", None)
            one = item.pop("seed", None)
            values = raw if raw is not None else [one]
            if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in values):
                raise CliError(f"--prompt-file line {number}: seed(s) must be integers")
            count = item.pop("batch_count", 1)
            line_seeds = [resolve_seed(v if v >= 0 else None) + k for v in values for k in range(count)]
        elif "batch_count" in item:
            count = item.pop("batch_count")
            line_seeds = [seeds[0] + k for k in range(count)] if isinstance(count, int) else seeds
        refs = item.pop("ref_images", ref_images)
        prompt, negative = item.pop("prompt"), item.pop("negative_prompt", negative_prompt)
        init, output, line_mask = item.pop("init_img", init_img), item.pop("output", None), item.pop("mask", mask)
        try:
            overrides = parse_request(item, where=f"--prompt-file line {number}")
        except InvalidArgumentError as e:
            raise CliError(str(e)) from None
        jobs.append(Job(prompt=prompt, negative_prompt=negative, seeds=list(line_seeds), prompt_index=i,
                        init_img=init, mask=line_mask, ref_images=list(refs) if isinstance(refs, list) else [refs],
                        output=output,
                        overrides=overrides))
    return jobs


def slug(prompt: str, words: int = 6) -> str:
    s = "-".join(re.findall(r"[a-z0-9]+", prompt.lower())[:words])
    return s[:48] or "image"


class OutputNames:
    """File names for the images of one run, by sd-cli's rules (see the module's docstring)."""

    def __init__(self, output: str, total: int, begin: int = -1, allow_outside: bool = False) -> None:
        self.output = output
        self.total = total
        self.begin = max(begin, 0)
        self.allow_outside = allow_outside

    def name(self, index: int, job: Job, seed: int, settings: Any) -> Path:
        """The image's path; a prompt file's ``output`` is relative to -o's folder and stays in it."""
        out = self._name(index, job, seed, settings)
        if job.output is None:
            return out
        base = Path(self.output).parent
        if not self.allow_outside and (out.is_absolute() or not (base / out).resolve().is_relative_to(base.resolve())):
            raise CliError(f"--prompt-file: output {job.output!r} leaves -o's folder ({base}); "
                           "--allow-output-outside allows it")
        return base / out

    def _name(self, index: int, job: Job, seed: int, settings: Any) -> Path:
        pattern = job.output or self.output
        if not isinstance(pattern, str):
            raise CliError(f"--prompt-file: output must be a string, not {type(pattern).__name__}")
        widths = [int(w) for _, _, spec, _ in _fields(pattern) for w in re.findall(r"\d+", spec or "")]
        if any(w > MAX_WIDTH for w in widths):
            raise CliError(f"-o {pattern[:60]!r}: a template width over {MAX_WIDTH}")
        fields = {"index": self.begin + index, "prompt_index": job.prompt_index, "seed": seed,
                  "steps": settings.steps, "width": settings.width, "height": settings.height,
                  "slug": slug(job.prompt)}
        if "{" in pattern:
            try:
                path = pattern.format(**fields)
            except (KeyError, IndexError, ValueError) as e:
                raise CliError(f"-o {pattern!r}: bad template ({e}); fields: {', '.join(fields)}") from None
        elif _PRINTF.search(pattern):
            path = _printf(pattern, self.begin + index)
        elif (self.total > 1 and job.output is None) or (job.output is not None and len(job.seeds) > 1):
            p = Path(pattern)
            stem = p.with_suffix("") if p.suffix.lower() in IMAGE_SUFFIXES else p
            path = f"{stem}_{self.begin + index}{p.suffix if p.suffix.lower() in IMAGE_SUFFIXES else '.png'}"
        else:
            path = pattern
        out = Path(path)
        return out if out.suffix.lower() in IMAGE_SUFFIXES else out.with_name(out.name + ".png")


def _fields(pattern: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(string.Formatter().parse(pattern)) if "{" in pattern else []
    except ValueError as e:
        raise CliError(f"-o {pattern[:60]!r}: bad template ({e})") from None


def _printf(pattern: str, index: int) -> str:
    result = pattern
    while m := _PRINTF.search(result):
        spec = m.group(1)
        result = result[:m.start(1)] + (spec % index) + result[m.end(1):]
    return result.replace("%%", "%")
