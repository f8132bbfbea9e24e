"""Kernels and the weight policy (issue 10), side by side in one run: each configuration
of weights (a file's type kept in the repacked or the plain kernels' layout, or expanded
to F16/BF16 at load) in its own process, at several sizes, with load, encode, s/step,
decode and peak RSS; each step's achieved GFLOP/s against PyTorch's BF16 and FP32 GEMM
(oneDNN / MKL) on the same shapes and cores; diffusers' transformer in BF16 and FP32 as
the peer; a perf profile of a step by kernel; the loader's time (read, expand, repack)
for the installed library beside a baseline build; and the issue's goals, met or not, as
ratios.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import profile_step
from compare import VENV_DIFFUSERS, run_diffusers
from harness import HERE, run_child, run_spec, write_json
from roofline import gemm_shapes, step_flops

from sdcpp_py.modelfile import inspect

PROMPT = "a red fox in the snow, morning light"
# Klein's prompts are padded to 512 tokens, Z-Image's are not: the encoder goal is Klein's
PARTS = ("rows", "gemm", "diffusers", "profile", "load")

# key: (DiT file type, context settings, label); every row's text encoder is a Q4_K file
CONFIGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "q4_0": ("q4_0", {}, "Q4_0 file, defaults (repacked)"),
    "q4_0-plain": ("q4_0", {"repack": "none", "upcast": "none"}, "Q4_0 file, plain kernels (before repacking)"),
    "q4_k": ("q4_k", {}, "Q4_K file, defaults (repacked)"),
    "q4_k-plain": ("q4_k", {"repack": "none", "upcast": "none"}, "Q4_K file, plain kernels"),
    "iq4_nl": ("iq4_nl", {}, "IQ4_NL file, defaults (repacked)"),
    "f16": ("q4_0", {"upcast": "diffusion", "upcast_type": "f16"}, "Q4_0 DiT expanded to F16 (the old default)"),
    "f16-all": ("q4_0", {"upcast": "all", "upcast_type": "f16"},
                "Q4_0 DiT + encoder expanded to F16 (the old default)"),
    "bf16": ("q4_0", {"upcast": "diffusion", "upcast_type": "bf16"}, "Q4_0 DiT expanded to BF16"),
    "bf16-all": ("q4_0", {"upcast": "all", "upcast_type": "bf16"}, "Q4_0 DiT + encoder expanded to BF16"),
    "q8_0": ("q8_0", {}, "Q8_0 file, defaults"),
    "q8_0-kept": ("q8_0", {"upcast": "none"}, "Q8_0 file kept as stored"),
    "q4_k-fa": ("q4_k", {"diffusion_flash_attn": True}, "Q4_K file, defaults + flash attention in the DiT"),
    "q4_k-ggml": ("q4_k", {}, "Q4_K file, repacked, ggml's own kernel (the int8 VNNI GEMM off)"),
    "q4_k-256": ("q4_k", {}, "Q4_K file, repacked, the int8 VNNI GEMM's 256-bit form"),
    "q4_0-ggml": ("q4_0", {}, "Q4_0 file, repacked, ggml's own kernel (the int8 VNNI GEMM off)"),
    "iq4_nl-ggml": ("iq4_nl", {}, "IQ4_NL file, repacked, ggml's own kernel (the int8 VNNI GEMM off)"),
    "q4_k-f32attn": ("q4_k", {}, "Q4_K file, defaults, attention on the F32 path (the BF16 flash tiles off)"),
}
# configurations that differ in the engine's environment only (the switches of vendor/patches/0018
# and 0020), so that ggml's kernels and ours are measured in one build, one run
CONFIG_ENV: dict[str, dict[str, str]] = {"q4_k-ggml": {"GGML_CPU_VNNI_GEMM": "0"},
                                         "q4_k-256": {"GGML_CPU_VNNI_GEMM": "256"},
                                         "q4_0-ggml": {"GGML_CPU_VNNI_GEMM": "0"},
                                         "iq4_nl-ggml": {"GGML_CPU_VNNI_GEMM": "0"},
                                         "q4_k-f32attn": {"GGML_CPU_FA_BF16": "0"}}
# family: [((width, height), steps, config keys)]
PLAN: dict[str, list[tuple[tuple[int, int], int, list[str]]]] = {
    "z-image-turbo": [((256, 256), 1, ["q4_0", "q4_0-ggml", "q4_0-plain", "q4_k", "q4_k-ggml", "q4_k-256",
                                        "q4_k-plain", "q4_k-f32attn", "iq4_nl", "iq4_nl-ggml", "f16", "bf16", "q8_0",
                                        "q8_0-kept"]),
                      ((512, 512), 1, ["q4_0", "q4_0-ggml", "q4_k", "q4_k-ggml", "q4_k-256", "q4_k-f32attn", "f16",
                                        "bf16", "q4_k-fa"]),
                      ((1024, 1024), 1, ["q4_k", "q4_k-ggml", "q4_k-f32attn", "bf16", "q4_k-fa"])],
    "flux2-klein": [((256, 256), 1, ["q4_k", "q4_k-ggml", "q4_k-f32attn", "q4_k-plain", "q4_0", "f16-all", "bf16",
                                     "bf16-all"]),
                    ((512, 512), 1, ["q4_k", "q4_k-ggml", "q4_k-f32attn", "bf16"])],
}
QUICK_PLAN = [((64, 64), 1, ["q4_0", "q4_0-plain", "q4_k", "bf16"])]
# diffusers peers: family -> [(width, height, dtype)]
PEERS = {"z-image-turbo": [(256, 256, "bfloat16"), (256, 256, "float32"), (512, 512, "bfloat16")],
         "flux2-klein": [(256, 256, "bfloat16"), (256, 256, "float32")]}
# family: [(config, width)] profiled (square sizes); --quick profiles the first at 64x64
PROFILES = {"z-image-turbo": [("q4_k", 256), ("q4_k-ggml", 256), ("bf16", 256), ("q4_k", 512), ("q4_k-f32attn", 512)],
            "flux2-klein": [("q4_k", 256), ("q4_k-ggml", 256)]}

# family: configurations whose load is timed for each library (the installed one, a baseline)
LOADS = {"z-image-turbo": ["q4_k", "q8_0", "bf16", "f16"], "flux2-klein": ["q4_k", "bf16-all", "f16-all"]}
QUICK_LOADS = ["q4_k", "bf16"]

ModelsFor = Callable[[str, str], Any]   # (dit_type, llm_type) -> SyntheticModelSet
# the engine's loader reports where its time went, per load (summed here over the components);
# its per-phase figures are thread-seconds divided by the loader's thread count
_LOAD_SPLIT = re.compile(r"loading tensors completed, taking ([\d.]+)s \(process: [\d.]+s, read: ([\d.]+)s, "
                         r"memcpy: [\d.]+s, convert: ([\d.]+)s, copy_to_backend: ([\d.]+)s\)")


def load_split(log: str) -> dict[str, float]:
    """Seconds of the engine's tensor loading: total, reading, converting (expansion), and
    copying into backend buffers (where the repacked buffers repack)."""
    out = {"tensors_s": 0.0, "read_s": 0.0, "convert_s": 0.0, "repack_copy_s": 0.0}
    for m in _LOAD_SPLIT.finditer(log):
        for key, value in zip(out, m.groups(), strict=True):
            out[key] += float(value)
    return {k: round(v, 2) for k, v in out.items()}


def _files(models: Any) -> dict[str, str]:
    return {"diffusion_model": str(models.diffusion_model), "llm": str(models.llm), "vae": str(models.vae)}


def _row(key: str, family: str, size: tuple[int, int], steps: int, models_for: ModelsFor, args: Any,
         work: Path) -> dict[str, Any]:
    dit_type, context, label = CONFIGS[key]
    models = models_for(dit_type, "q4_k")
    spec = {"files": _files(models), "context": {"n_threads": args.threads, **context}, "prompt": PROMPT,
            "items": [{"width": size[0], "height": size[1], "steps": steps, "seed": 7}]}
    r = run_spec(spec, work, f"{family}-{size[0]}x{size[1]}-{key}", env=CONFIG_ENV.get(key))
    item = r.report["items"][0]
    weights = r.report.get("weights", {})
    return {"key": key, "label": label, "family": family, "width": size[0], "height": size[1], "steps": steps,
            "dit_file": dit_type, "llm_file": "q4_k", "context": context,
            "load_s": round(r.report["load_s"], 3),
            "load_split": load_split((work / f"{family}-{size[0]}x{size[1]}-{key}.log").read_text()),
            "encode_s": round(r.report["encode_s"], 3),
            "step_s": round(item["step_s"], 3), "decode_s": round(item["decode_s"], 3),
            "wall_s": round(r.wall_s, 1), "peak_rss_mb": round(r.peak_rss_mb), "text_tokens": r.report["text_tokens"],
            "cpu_variant": r.report["cpu_variant"], "threads": r.report["threads"],
            "plan": _plan(weights),
            "buffers_mb": {c: {k: round(v / 2**20) for k, v in b.items()} for c, b in weights.get("buffers", {}).items()},
            "dit_path": str(models.diffusion_model)}


def _plan(weights: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each component's weight plan as a report states it: file type, type in memory, kernel."""
    return {c: {k: p[k] for k in ("file_type", "memory_type", "kernel")}
            for c, p in weights.get("per_component", {}).items()}


def _warm(models: Any) -> None:
    """Read the files once so that every load in the comparison starts from the page cache."""
    for path in _files(models).values():
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def _libraries(args: Any) -> list[tuple[str, dict[str, str]]]:
    """(name, environment) of each library whose load is timed: the installed one, and a
    baseline build (``--baseline-library``, e.g. the previous commit's) when given."""
    libs: list[tuple[str, dict[str, str]]] = [("installed", {})]
    if getattr(args, "baseline_library", None):
        libs.append(("baseline", {"SDCPP_PY_LIBRARY": str(Path(args.baseline_library).resolve())}))
    return libs


def _load_row(key: str, family: str, library: tuple[str, dict[str, str]], models_for: ModelsFor, args: Any,
              work: Path) -> dict[str, Any]:
    dit_type, context, label = CONFIGS[key]
    models = models_for(dit_type, "q4_k")
    _warm(models)
    spec = {"files": _files(models), "context": {"n_threads": args.threads, **context}, "prompt": PROMPT,
            "items": []}
    tag = f"{family}-load-{key}-{library[0]}"
    r = run_spec(spec, work, tag, env=library[1])
    return {"key": key, "label": label, "family": family, "library": library[0],
            "load_s": round(r.report["load_s"], 2), "load_split": load_split((work / f"{tag}.log").read_text()),
            "peak_rss_mb": round(r.peak_rss_mb), "cpu_variant": r.report["cpu_variant"],
            "plan": _plan(r.report.get("weights", {}))}


def _gemm_peak(shapes: dict, args: Any, work: Path, tag: str) -> dict[str, Any]:
    """PyTorch's BF16 / FP32 GEMM GFLOP/s on a step's shapes (matrix-vector products left out)."""
    if not VENV_DIFFUSERS.exists():
        return {"skipped": "PyTorch not set up: run benchmarks/setup_external.sh diffusers"}
    rows = [[r, i, o, n] for (r, i, o), n in shapes.items() if r >= 16]
    spec = {"job": "gemm", "shapes": rows, "threads": args.threads, "reps": 2}
    path = work / f"{tag}-gemm.json"
    path.write_text(json.dumps(spec))
    r = run_child([str(VENV_DIFFUSERS), str(HERE / "ext_diffusers.py"), str(path)], log=work / f"{tag}-gemm.log")
    return {k: r.report[k] for k in ("bfloat16", "float32", "torch", "cpu_capability")}


def _peer(family: str, size: tuple[int, int], dtype: str, text_tokens: int, args: Any, work: Path) -> dict[str, Any]:
    base = {"family": family, "width": size[0], "height": size[1], "dtype": dtype}
    if not VENV_DIFFUSERS.exists():
        return {**base, "skipped": "diffusers not set up: run benchmarks/setup_external.sh diffusers"}
    params = {"z-image-turbo": 6.155e9, "flux2-klein": 3.876e9}[family]
    need_gb = params * (4 if dtype == "float32" else 2) / 1e9
    mem_gb = _mem_total_gb()
    if need_gb > 0.85 * mem_gb:
        return {**base, "skipped": f"{params / 1e9:.2f}B parameters in {dtype} need {need_gb:.1f} GB: "
                                   f"more than this machine's {mem_gb:.1f} GB allow"}
    spec = {"job": "transformer", "family": family, "width": size[0], "height": size[1], "steps": 2,
            "text_tokens": text_tokens, "threads": args.threads, "dtype": dtype, "weights": "random"}
    tag = f"{family}-{size[0]}x{size[1]}-diffusers-{dtype}"
    r = run_diffusers(spec, work, tag)
    if isinstance(r, str):
        return {**base, "skipped": r}
    return {**base, **{k: r.report[k] for k in ("step_s", "steps_s", "load_s", "tokens", "torch", "params")},
            "peak_rss_mb": round(r.peak_rss_mb)}


def _text_tokens(family: str, work: Path) -> int:
    """The prompt's token count without a full-size row in this run: the tiny model set of the
    family shares the full one's tokenizer and chat template, so it encodes to the same length."""
    from sdcpp_py import Pipeline
    from sdcpp_py.synthetic import write_model_set

    m = write_model_set(family, work / "tiny-models", size="tiny")
    with Pipeline(diffusion_model=m.diffusion_model, llm=m.llm, vae=m.vae) as pipe:
        return int(pipe.encode(PROMPT).context.shape[0])


def _mem_total_gb() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(text.split("MemTotal:")[1].split()[0]) / 2**20


def _profile(key: str, family: str, size: tuple[int, int], models_for: ModelsFor, args: Any,
             work: Path) -> dict[str, Any]:
    dit_type, context, label = CONFIGS[key]
    models = models_for(dit_type, "q4_k")
    spec = {"files": _files(models), "context": {"n_threads": args.threads, **context}, "prompt": PROMPT,
            "item": {"width": size[0], "height": size[1], "steps": 1, "seed": 7}}
    res = profile_step.profile(spec, work, f"{family}-{size[0]}x{size[1]}-{key}-profile", env=CONFIG_ENV.get(key))
    return {"key": key, "label": label, "family": family, "width": size[0], "height": size[1], **res}


def run(families: list[str], models_for: Callable[[str, str, str], Any], args: Any, work: Path) -> dict[str, Any]:
    """models_for(family, dit_type, llm_type) gives the synthetic set (written on first use)."""
    parts = set(args.kernel_parts.split(","))
    sizes = set(args.kernel_sizes.split(",")) if args.kernel_sizes else None
    keys = set(args.kernel_configs.split(",")) if args.kernel_configs else None
    res: dict[str, Any] = {"rows": [], "gemm": [], "peers": [], "profiles": [], "loads": []}

    def save() -> None:
        write_json(work / "kernels-partial.json", res)

    def fam_models(family: str) -> ModelsFor:
        return lambda d, t: models_for(family, d, t)

    # smallest sizes first, across families: the long 1 MP rows come last
    groups = [(family, *g) for family in families for g in (QUICK_PLAN if args.quick else PLAN[family])]
    for family, size, steps, cfgs in sorted(groups, key=lambda g: g[1][0] * g[1][1]):
        if sizes is not None and str(size[0]) not in sizes:
            continue
        rows = []
        for key in cfgs:
            if (keys is None or key in keys) and "rows" in parts:
                rows.append(_row(key, family, size, steps, fam_models(family), args, work))
                res["rows"].append(rows[-1])
                save()
        if rows and "gemm" in parts:
            f = inspect(Path(rows[0]["dit_path"]))
            img = (size[0] // 16) * (size[1] // 16)
            txt = rows[0]["text_tokens"]
            flops = step_flops(f, family, img, txt, _width(f))
            peak = _gemm_peak(gemm_shapes(f, family, img, txt), args, work, f"{family}-{size[0]}x{size[1]}")
            res["gemm"].append({"family": family, "width": size[0], "height": size[1], "image_tokens": img,
                                "text_tokens": txt, "step_gflop": round(flops["total"] / 1e9, 1),
                                "attention_share": round(flops["attention"] / flops["total"], 3), **peak})
            save()
    for family in families:
        if "diffusers" in parts and not args.quick:
            txt = next((r["text_tokens"] for r in res["rows"] if r["family"] == family), None)
            txt = txt or _text_tokens(family, work)
            for w, h, dtype in PEERS[family]:
                if sizes is None or str(w) in sizes:
                    res["peers"].append(_peer(family, (w, h), dtype, txt, args, work))
                    save()
        if "profile" in parts:
            for key, width in [(PROFILES[family][0][0], 64)] if args.quick else PROFILES[family]:
                if keys is None or key in keys:
                    res["profiles"].append(_profile(key, family, (width, width), fam_models(family), args, work))
                    save()
        if "load" in parts:
            # which library loads first alternates per configuration, so that neither always
            # meets the same machine state (page cache, free memory): unchanged loads measured
            # up to 1.8x apart between runs
            libs = _libraries(args)
            for n, key in enumerate(QUICK_LOADS if args.quick else LOADS[family]):
                if keys is None or key in keys:
                    for lib in libs if n % 2 == 0 else libs[::-1]:
                        res["loads"].append(_load_row(key, family, lib, fam_models(family), args, work))
                        save()
    res["goals"] = goals(res)
    return res


def _width(f: Any) -> int:
    embed = next(t for n, t in f.tensors.items() if n.endswith(("x_embedder.weight", "img_in.weight")))
    return int(embed.shape[0])


# ---------------------------------------------------------------------------------------------
# Derived figures: GFLOP/s against the GEMM peaks, the goals
# ---------------------------------------------------------------------------------------------


def _gemm_for(res: dict[str, Any], row: dict[str, Any]) -> dict[str, Any] | None:
    return next((g for g in res["gemm"] if (g["family"], g["width"], g["height"]) ==
                 (row["family"], row["width"], row["height"])), None)


def achieved(res: dict[str, Any], row: dict[str, Any]) -> dict[str, float]:
    g = _gemm_for(res, row)
    if g is None:
        return {}
    gflops = g["step_gflop"] / row["step_s"] if row["step_s"] else float("nan")
    out = {"gflops": round(gflops, 1)}
    for dtype, short in (("bfloat16", "bf16"), ("float32", "fp32")):
        if dtype in g:
            out[f"of_{short}_gemm"] = round(gflops / g[dtype]["gflops"], 2)
    return out


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals at every size where both sides were measured: (goal, ratio, met)."""
    out: list[dict[str, Any]] = []
    groups: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    for r in res["rows"]:
        groups.setdefault((r["family"], r["width"], r["height"]), {})[r["key"]] = r

    def add(where: tuple[str, int, int], goal: str, num: float, den: float, target: float, le: bool,
            note: str = "") -> None:
        value = num / den if den else float("nan")
        met = value <= target if le else value >= target
        out.append({"family": where[0], "size": f"{where[1]}x{where[2]}", "goal": goal, "ratio": round(value, 3),
                    "target": f"{'≤' if le else '≥'} {target}", "met": bool(met), "note": note})

    for where, rows in groups.items():
        expanded = [rows[k] for k in ("f16", "bf16", "f16-all") if k in rows]
        best = min(expanded, key=lambda r: r["step_s"]) if expanded else None
        for key, limit in (("q4_0", 1.0), ("iq4_nl", 1.0), ("q4_k", 1.1)):
            if key in rows and best:
                r = rows[key]
                add(where, f"{key} repacked s/step vs best expanded ({best['key']})", r["step_s"], best["step_s"],
                    limit, True)
                add(where, f"{key} repacked peak RSS vs best expanded", r["peak_rss_mb"], best["peak_rss_mb"],
                    0.45, True)
            if key in rows and "q4_0-plain" in rows:
                add(where, f"{key} repacked speed-up vs Q4_0 as stored (plain)",
                    rows["q4_0-plain"]["step_s"], rows[key]["step_s"], 2.0, False)
        if "q4_k" in rows and "q4_k-plain" in rows and where[0] == "flux2-klein":
            a, b = rows["q4_k-plain"], rows["q4_k"]
            add(where, "text encoder (512 tokens) at Q4_K: speed-up repacked vs plain", a["encode_s"], b["encode_s"],
                1.5, False, f"encoder buffers {b['buffers_mb'].get('encoder')} vs {a['buffers_mb'].get('encoder')} MB")
        old = rows.get("f16-all") or rows.get("f16")
        if "q4_k" in rows and old:
            add(where, f"package defaults (Q4_K file) step speed-up vs the old default ({old['key']})",
                old["step_s"], rows["q4_k"]["step_s"], 1.25, False)
        for r in rows.values():
            if r["key"] in ("f16", "bf16", "f16-all"):
                a = achieved(res, r)
                if "of_bf16_gemm" in a:
                    add(where, f"{r['key']} step: fraction of PyTorch's BF16 GEMM peak", a["of_bf16_gemm"], 1, 0.8, False)
                if "of_fp32_gemm" in a:
                    add(where, f"{r['key']} step: fraction of PyTorch's FP32 GEMM peak", a["of_fp32_gemm"], 1, 0.8, False)
    # the int8 VNNI GEMMs (vendor/patches/0018) stay where they are faster than ggml's kernels
    for where, rows in groups.items():
        for key in ("q4_k", "q4_0", "iq4_nl"):
            if key in rows and f"{key}-ggml" in rows:
                add(where, f"{key}: int8 VNNI GEMM step vs ggml's kernel", rows[key]["step_s"],
                    rows[f"{key}-ggml"]["step_s"], 1.0, True)
    for p in res["peers"]:
        if "step_s" not in p or p["dtype"] != "bfloat16":
            continue
        ours = groups.get((p["family"], p["width"], p["height"]), {}).get("q4_k")
        if ours:
            where = (p["family"], p["width"], p["height"])
            add(where, "our default step vs diffusers BF16 step", ours["step_s"], p["step_s"], 0.8, True)   # issue 24
            add(where, "our default peak RSS (whole pipeline) vs diffusers BF16 (transformer alone)",
                ours["peak_rss_mb"], p["peak_rss_mb"], 0.5, True)
    return out


def markdown(res: dict[str, Any]) -> list[str]:
    md: list[str] = []
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in res["rows"]:
        groups.setdefault((r["family"], r["width"], r["height"]), []).append(r)
    for (family, w, h), rows in groups.items():
        g = _gemm_for(res, rows[0]) or {}
        peaks = ", ".join(f"{k} {g[k]['gflops']:.0f}" for k in ("bfloat16", "float32") if k in g)
        md += [f"### {family}, {w}x{h}, {rows[0]['steps']} step(s), {rows[0]['text_tokens']} text tokens"
               + (f"; {g['step_gflop']:.0f} GFLOP per step; PyTorch GEMM GFLOP/s on its shapes: {peaks}" if g else ""),
               "", "| setting | DiT in memory | encoder in memory | load s | of which convert / repack s | encode s | s/step "
               "| decode s | peak RSS MB | DiT MB | GFLOP/s | of BF16 GEMM | of FP32 GEMM |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            a = achieved(res, r)
            dit = r["plan"].get("diffusion", {})
            enc = r["plan"].get("encoder", {})
            split = r.get("load_split", {})
            md.append(f"| {r['label']} | {dit.get('memory_type')} ({dit.get('kernel')}) | {enc.get('memory_type')} "
                      f"({enc.get('kernel')}) | {r['load_s']} | {split.get('convert_s', '')} / {split.get('repack_copy_s', '')} | {r['encode_s']} | {r['step_s']} | {r['decode_s']} | "
                      f"{r['peak_rss_mb']} | {sum(r['buffers_mb'].get('diffusion', {}).values())} | "
                      f"{a.get('gflops', '')} | {a.get('of_bf16_gemm', '')} | {a.get('of_fp32_gemm', '')} |")
        md.append("")
    if res["peers"]:
        md += ["### diffusers (transformer alone, random weights, same token counts)", "",
               "| family | size | dtype | s/step | peak RSS MB | note |", "|---|---|---|---|---|---|"]
        for p in res["peers"]:
            step = f"{p['step_s']:.2f}" if "step_s" in p else "-"
            md.append(f"| {p['family']} | {p['width']}x{p['height']} | {p['dtype']} | {step} | "
                      f"{p.get('peak_rss_mb', '-')} | {p.get('skipped', '')} |")
        md.append("")
    for p in res["profiles"]:
        md += [f"### Profile: {p['family']} {p['width']}x{p['height']}, {p['label']}", ""]
        if "skipped" in p:
            md += [p["skipped"], ""]
            continue
        md += [f"{p.get('samples')} samples over the denoising call ({p.get('profiled_s', 0):.1f} s); weights "
               f"{p.get('weights')}", "", "| where | share |", "|---|---|"]
        md += [f"| {c['category']} | {c['percent']:.1f}% |" for c in p["categories"]]
        md += ["", "Top symbols: " + "; ".join(f"{t['symbol']} {t['percent']}%" for t in p["top"][:8]), ""]
    if res["loads"]:
        md += ["### Load (the engine loader's own split: thread-seconds over its threads)", "",
               "| family | setting | DiT in memory | library | load s | read s | convert s | repack / copy s "
               "| peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["loads"]:
            split, dit = r["load_split"], r["plan"].get("diffusion", {})
            md.append(f"| {r['family']} | {r['label']} | {dit.get('memory_type')} ({dit.get('kernel')}) | "
                      f"{r['library']} | {r['load_s']} | {split['read_s']} | {split['convert_s']} | "
                      f"{split['repack_copy_s']} | {r['peak_rss_mb']} |")
        md.append("")
    if res.get("goals"):
        md += ["### Goals", "", "| family | size | goal | ratio | target | met |", "|---|---|---|---|---|---|"]
        md += [f"| {g['family']} | {g['size']} | {g['goal']} | {g['ratio']} | {g['target']} | "
               f"{'yes' if g['met'] else 'no'} {g['note']} |" for g in res["goals"]]
        md.append("")
    return md

