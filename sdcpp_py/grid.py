"""Sweep grids: a file of model sets and sweeps, expanded into rows with stable ids.

A row is one image: a model set's name, a prompt, a seed and any other
``Pipeline.generate`` argument. Its id is a hash of exactly those (and of the model
set's files and settings), so the same grid gives the same ids on any machine, a
re-run finds what is already made, and a row named by two sweeps is made once.

A grid file (YAML or JSON; paths relative to the file)::

    models:
      q4k: {diffusion_model: z_image_turbo-Q4_K.gguf, llm: Qwen3-4B-Q4_K_M.gguf, vae: ae.safetensors}
      q8:  {diffusion_model: z_image_turbo-Q8_0.gguf, llm: Qwen3-4B-Q4_K_M.gguf, vae: ae.safetensors,
            settings: {upcast: none}}
    defaults: {model: q4k, prompt: a lighthouse at dawn, seed: 42, size: 512x512, steps: 4}
    sweeps:
      steps: {steps: [3, 5, 7, 9]}
      seeds: {seed: "0:15"}
      aspect: {size: [1024x576, 576x1024, 768x768]}
      quantization: {model: [q4k, q8]}
    rows:                      # rows given one by one (optional)
      - {prompt: a red door, seed: 7}

In a sweep (and in ``defaults``) a list sweeps that key; a sweep's keys multiply
(seeds x steps ...). ``sigmas`` and ``ref_images`` take lists as values, so a
list of lists sweeps them. ``seed: "A:B"`` is the seeds A to B inclusive;
``size: WxH`` sets width and height. Model sets that share an ``llm`` file share
one text encoder when they run one after the other.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError
from .fileid import file_hash
from .modelset import ModelSet, absolute, content, model_set
from .settings import lora_pairs, parse_request, parse_size, request, request_fields, seed_range

IMAGE_KEYS = ("init_image", "mask", "ref_images", "control_image")      # file paths
LIST_VALUED = ("sigmas", "ref_images", "loras")   # lists as values: a list of lists sweeps them
MAX_SEED = 2**63 - 1
MAX_ROWS = 1_000_000


@dataclass(frozen=True)
class Row:
    """One image: a model set, a prompt, a seed and other generate() arguments."""

    row_id: str
    model: str
    params: dict[str, Any]      # generate() keywords, prompt and seed included
    sweeps: tuple[str, ...] = ()

    @property
    def prompt_key(self) -> tuple[str, str]:
        return self.params["prompt"], self.params.get("negative_prompt", "")

    def to_dict(self) -> dict[str, Any]:
        return {"row_id": self.row_id, "model": self.model, "params": self.params, "sweeps": list(self.sweeps)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Row:
        return cls(d["row_id"], d["model"], dict(d["params"]), tuple(d.get("sweeps", ())))


@dataclass
class Grid:
    models: dict[str, ModelSet]
    rows: list[Row]


def row_keys() -> list[str]:
    """What a row may set: every request field but batch_count (a row is one image), and images."""
    return [k for k in request_fields() if k != "batch_count"] + list(IMAGE_KEYS)


# -- rows ----------------------------------------------------------------------------------------
def _image_identity(path: str) -> dict[str, str]:
    """An input image in a row id: its name and content, not the folder it sits in."""
    p = Path(path)
    try:
        return {"name": p.name, "sha256": file_hash(p)}
    except OSError as e:
        raise InvalidArgumentError(f"cannot read the image {path}: {e}") from None


def row_id(models: Mapping[str, ModelSet], model: str, params: Mapping[str, Any]) -> str:
    """A hash of the model set's identity and the row's settings (images by name and content, LoRA
    files by content)."""
    keyed = dict(params)
    if "loras" in keyed:
        keyed["loras"] = [[content(p), w] for p, w in keyed["loras"]]
    for key in ("init_image", "mask", "control_image"):
        if key in keyed:
            keyed[key] = _image_identity(keyed[key])
    if "ref_images" in keyed:
        keyed["ref_images"] = [_image_identity(r) for r in keyed["ref_images"]]
    text = json.dumps({"model": models[model].identity, "params": keyed}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _seed(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SEED:
        raise InvalidArgumentError(f"a grid's seeds must be integers in [0, 2**63), not {v!r} "
                                   "(a sweep is reproducible: no random seeds)")
    return v


def _seeds(v: Any) -> list[int]:
    if isinstance(v, str) and ":" in v:
        return seed_range(v, MAX_ROWS)
    return [_seed(s) for s in (v if isinstance(v, list) else [v])]


def _choices(key: str, v: Any) -> list[Any]:
    """The values a sweep gives ``key``: a list sweeps it (a list of lists for list-valued keys)."""
    if isinstance(v, list) and not v:
        raise InvalidArgumentError(f"{key}: an empty list sweeps nothing")
    if key == "seed":
        return _seeds(v)
    if key == "size":
        if isinstance(v, list) and v and not all(isinstance(x, int) for x in v):
            return [parse_size(x) for x in v]
        return [parse_size(v)]
    if key in LIST_VALUED:
        return list(v) if isinstance(v, list) and v and all(isinstance(x, list) for x in v) else [v]
    return list(v) if isinstance(v, list) else [v]


def _flat(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A sweep's (or the defaults') keys with ``size`` as width and height, so that a sweep's
    width or size wins over the defaults' whichever of them each names."""
    if not isinstance(spec, Mapping):
        raise InvalidArgumentError(f"{where} must be a mapping of settings")
    out = {str(k): v for k, v in spec.items()}
    keys = row_keys()
    for k in out:
        if k not in keys and k not in ("model", "size"):
            raise InvalidArgumentError(f"{where}: unknown grid key {k!r}; rows take: model, size, {', '.join(keys)}")
    if "size" in out:
        if "width" in out or "height" in out:
            raise InvalidArgumentError(f"{where}: give size or width/height, not both")
        sizes = _choices("size", out.pop("size"))
        if len(sizes) == 1:
            out["width"], out["height"] = sizes[0]
        else:
            out["size"] = sizes            # a size sweep: width and height move together
    return out


def _expand(spec: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    keys = list(spec)
    choices = [spec[k] if k == "size" else _choices(k, spec[k]) for k in keys]
    for values in itertools.product(*choices):
        out: dict[str, Any] = {}
        for k, v in zip(keys, values, strict=True):
            if k == "size":
                out["width"], out["height"] = v
            else:
                out[k] = v
        yield out


def _merge(defaults: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The defaults under a sweep's keys; a sweep's size replaces the defaults' width and height,
    its width or height replaces a size sweep of the defaults."""
    out = dict(defaults)
    if "size" in spec:
        for k in ("width", "height"):
            out.pop(k, None)
    elif "width" in spec or "height" in spec:
        out.pop("size", None)
    out.update(spec)
    return out


def _checked(params: dict[str, Any]) -> dict[str, Any]:
    """The row's values as the request holds them (2 and 2.0, "Euler" and "euler" give one id), or
    a clear error now rather than on a worker after its models have loaded."""
    images = {k: params.pop(k) for k in IMAGE_KEYS if k in params}
    try:
        values = parse_request(params, where="a row")
        if "batch_count" in values:
            raise InvalidArgumentError("a row is one image: no batch_count (sweep the seed)")
        s = request(**values)
    except (TypeError, ValueError) as e:
        shown = {k: params[k] for k in list(params)[:6]}
        raise InvalidArgumentError(f"row {shown}: {e}") from None
    canonical = {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(s, k)) for k in values)}
    return {**canonical, **images}


def make_rows(models: Mapping[str, ModelSet], entries: Iterable[tuple[str, Mapping[str, Any]]],
              base: Path | None = None) -> list[Row]:
    """Rows from (sweep name, flat row dict) pairs; rows with equal settings are merged.
    Image paths (init_image, ref_images) are taken relative to ``base``."""
    rows: dict[str, Row] = {}
    for sweep, entry in entries:
        params = {str(k): v for k, v in entry.items() if v is not None and not (isinstance(v, float) and v != v)}
        if "size" in params:
            if "width" in params or "height" in params:
                raise InvalidArgumentError("give size or width/height, not both")
            params["width"], params["height"] = parse_size(params.pop("size"))
        for key in ("init_image", "mask", "control_image"):
            if key in params:
                params[key] = absolute(params[key], base)
        if "loras" in params:                      # "file:weight" strings or [file, weight] pairs
            try:
                params["loras"] = [[absolute(p, base), w] for p, w in lora_pairs(params["loras"])]
            except TypeError as e:
                raise InvalidArgumentError(f"loras: {e}") from None
        if "ref_images" in params:
            refs = params["ref_images"]
            params["ref_images"] = [absolute(r, base) for r in (refs if isinstance(refs, list) else [refs])]
        model = params.pop("model", None)
        if model is None:
            if len(models) != 1:
                raise InvalidArgumentError(f"a row needs a model (one of {sorted(models)})")
            model = next(iter(models))
        if model not in models:
            raise InvalidArgumentError(f"unknown model set {model!r}; the grid has {sorted(models)}")
        unknown = set(params) - set(row_keys())
        if unknown:
            raise InvalidArgumentError(f"unknown row keys {sorted(unknown)}; rows take: model, {', '.join(row_keys())}")
        if not isinstance(params.get("prompt"), str):
            raise InvalidArgumentError("every row needs a prompt (a string)")
        params["seed"] = _seed(params.get("seed"))
        params = _checked(params)
        rid = row_id(models, model, params)
        if rid in rows:
            old = rows[rid]
            if sweep and sweep not in old.sweeps:
                rows[rid] = Row(rid, model, old.params, old.sweeps + (sweep,))
        else:
            rows[rid] = Row(rid, model, params, (sweep,) if sweep else ())
        if len(rows) > MAX_ROWS:
            raise InvalidArgumentError(f"the grid has more than {MAX_ROWS} rows")
    return list(rows.values())


def rows_from_table(models: Mapping[str, ModelSet], table: Iterable[Mapping[str, Any]] | Any) -> list[Row]:
    """Rows from a table: dicts, or a pandas DataFrame (one row each)."""
    if hasattr(table, "to_dict") and hasattr(table, "columns"):
        table = table.to_dict("records")
    return make_rows(models, (("", dict(r)) for r in table))


def build(spec: Mapping[str, Any], base: Path | None = None) -> Grid:
    """A Grid from a parsed grid file (see the module's doc)."""
    if not isinstance(spec, Mapping):
        raise InvalidArgumentError("a grid is a mapping with models, and sweeps and/or rows")
    unknown = set(spec) - {"models", "defaults", "sweeps", "rows"}
    if unknown:
        raise InvalidArgumentError(f"unknown grid sections {sorted(unknown)} (models, defaults, sweeps, rows)")
    raw_models = spec.get("models") or {}
    if not isinstance(raw_models, Mapping) or not raw_models:
        raise InvalidArgumentError("a grid needs models: a mapping of names to model files")
    models = {str(n): model_set(str(n), m, base) for n, m in raw_models.items()}
    defaults = _flat(spec.get("defaults") or {}, "defaults")
    sweeps = spec.get("sweeps") or {}
    if not isinstance(sweeps, Mapping):
        raise InvalidArgumentError("sweeps must map sweep names to settings")
    rows = spec.get("rows") or []
    if not isinstance(rows, Sequence) or isinstance(rows, str):
        raise InvalidArgumentError("rows must be a list of mappings")
    if not sweeps and not rows:
        raise InvalidArgumentError("a grid needs sweeps or rows")

    def entries() -> Iterable[tuple[str, dict[str, Any]]]:
        for name, sweep in sweeps.items():
            for entry in _expand(_merge(defaults, _flat(sweep, f"sweep {name!r}"))):
                yield str(name), entry
        for row in rows:
            if not isinstance(row, Mapping):
                raise InvalidArgumentError("rows must be a list of mappings")
            for entry in _expand(_merge(defaults, _flat(row, "a row"))):
                yield "", entry
    return Grid(models, make_rows(models, entries(), base))


def load(path: str | Path) -> Grid:
    """Read a grid file: YAML (``.yaml``/``.yml``, needs PyYAML) or JSON."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InvalidArgumentError(f"cannot read the grid file {p}: {e}") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InvalidArgumentError("YAML grid files need PyYAML: pip install 'sdcpp-py[ray]' "
                                       "(or write the grid as JSON)") from None
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InvalidArgumentError(f"{p}: not valid YAML: {e}") from None
    else:
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise InvalidArgumentError(f"{p}: not valid JSON: {e}") from None
    return build(spec, p.resolve().parent)
