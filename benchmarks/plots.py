"""PNG plots of a results dict written by ``run_all.py``: throughput per configuration, latency vs context.

Needs matplotlib (``pip install 'optimum-atb[bench]'``); without it no plot is written and a warning says so.
"""

from __future__ import annotations

import warnings
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: no plots (pip install 'optimum-atb[bench]')", stacklevel=3
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(rows: list[dict], path: Path, plt) -> Path | None:
    """Horizontal bars: stock and plugin tokens/s for every tokens/s row, the speedup written beside."""
    rows = [r for r in rows if r["unit"] == "tokens/s" and "context_len" not in r.get("extra", {})]
    if not rows:
        return None
    labels = [f"{r['benchmark']}: {r['config']} (vs {r['baseline']})" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh(
        [i + 0.2 for i in y], [r["baseline_value"] for r in rows], height=0.4, color="#bbbbbb", label="stock"
    )
    ax.barh(
        [i - 0.2 for i in y], [r["value"] for r in rows], height=0.4, color="#d9534f", label="optimum-atb"
    )
    for i, r in enumerate(rows):
        ax.text(max(r["value"], r["baseline_value"]) * 1.01, i, f"{r['ratio']:.2f}x", va="center", fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (higher is better)")
    ax.set_title("Throughput per configuration, stock vs optimum-atb (same run)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(rows: list[dict], path: Path, plt) -> Path | None:
    """Decode ms/token against context length, one line per configuration and its stock baseline."""
    rows = [r for r in rows if "context_len" in r.get("extra", {}) and r["unit"] == "tokens/s"]
    if not rows:
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        ctx = r["extra"]["context_len"]
        series.setdefault(f"{r['benchmark']}: {r['config']}", []).append((ctx, 1000 / r["value"]))
        series.setdefault(f"{r['benchmark']}: {r['baseline']}", []).append((ctx, 1000 / r["baseline_value"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode latency (ms/token, lower is better)")
    ax.set_title("Decode latency against context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: dict, out: str | Path) -> list[Path]:
    """Write throughput.png and latency_vs_context.png under `out` (each only when it has data)."""
    plt = _pyplot()
    if plt is None:
        return []
    out = Path(out)
    made = [
        plot_throughput(results["rows"], out / "throughput.png", plt),
        plot_latency(results["rows"], out / "latency_vs_context.png", plt),
    ]
    return [p for p in made if p is not None]
