"""PNG plots of a run's results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _barh(path: Path, labels: list[str], values: list[float], title: str, xlabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color="#4c72b0")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_all(results: dict[str, Any], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    for res in results.get("compare", []):
        rows = res["rows"]
        made.append(_barh(out / f"compare-{res['family']}.png", [r["name"] for r in rows],
                          [r["per_image_s"] for r in rows], f"{res['family']}: seconds per image", "s / image"))
    for res in results.get("knobs", []):
        rows = res["rows"]
        made.append(_barh(out / f"knobs-{res['family']}.png", [r["label"] for r in rows],
                          [r["step_s"] for r in rows], f"{res['family']}: DiT step by setting", "s / step"))
    roof = results.get("roofline", [])
    if roof:
        labels = [f"{r['family']} {r['width']}x{r['height']}" for r in roof]
        fig, ax = plt.subplots(figsize=(7, 0.6 * len(labels) + 1.5))
        y = range(len(labels))
        ax.barh([i + 0.2 for i in y], [r["peak_gflops_fp32_gemm"] for r in roof], 0.4, label="fp32 GEMM peak (numpy)")
        ax.barh([i - 0.2 for i in y], [r["achieved_gflops"] for r in roof], 0.4, label="DiT step achieved")
        ax.set_yticks(list(y), labels)
        ax.set_xlabel("GFLOP/s")
        ax.set_title("Roofline: achieved vs practical peak")
        ax.legend()
        fig.tight_layout()
        made.append(out / "roofline.png")
        fig.savefig(made[-1], dpi=100)
        plt.close(fig)
    for res in results.get("guide", []):
        for sweep, key, xlabel in (("steps", "steps", "steps"), ("ladder", "pixels", "megapixels"),
                                   ("aspects", "pixels", "megapixels")):
            data = res["sweeps"].get(sweep)
            if not data:
                continue
            rows = data["rows"]
            xs = [r["steps"] if key == "steps" else r["width"] * r["height"] / 1e6 for r in rows]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(xs, [r["denoise_s"] for r in rows], "o-", label="denoise")
            ax.plot(xs, [r["decode_s"] for r in rows], "s--", label="VAE decode")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("seconds")
            ax.set_title(f"{res['family']}: {sweep}")
            ax.legend()
            fig.tight_layout()
            made.append(out / f"guide-{res['family']}-{sweep}.png")
            fig.savefig(made[-1], dpi=100)
            plt.close(fig)
    return [str(p) for p in made]
