"""``rmserve runs plot``: a run's monitor series as a PNG, one panel per signal, one line per model.

Panels: reward mean with its 5-95% band, head disagreement, mean BRME sigma, length's Spearman
correlation with reward, saturation, and mean input length; the x axis is the window index (each window
holds the same number of inputs). Signals a model lacks (one head, no sigmas) are left out of its lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = (
    ("reward_mean", "reward (mean, 5-95%)"),
    ("disagreement", "head disagreement (mean std)"),
    ("sigma_mean", "BRME sigma (mean)"),
    ("length_spearman", "Spearman(reward, length)"),
    ("saturation", "share above reference p99"),
    ("length_mean", "input length (tokens)"),
)


def plot_run(series: dict[str, Any], out: Path, models: list[str] | None = None) -> list[str]:
    """Draw ``series`` (``GET /v1/runs/{run}``) into ``out``; returns the models drawn.

    Raises:
        ValueError: no model of the run has a closed window (or none of ``models`` is in it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = {m: s for m, s in series["models"].items() if (models is None or m in models) and s["windows"]}
    if not chosen:
        raise ValueError(
            f"run {series['id']!r} has no closed window"
            + (f" for {', '.join(models)}" if models else "")
            + "; a window closes every `window` scored inputs (GET /v1/runs says how many)."
        )
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex=True)
    for axis, (name, title) in zip(axes.flat, PANELS, strict=True):
        for model, data in chosen.items():
            windows = data["windows"]
            x = [w["index"] for w in windows]
            y = [w[name] if w[name] is not None else float("nan") for w in windows]
            (line,) = axis.plot(x, y, marker="o", markersize=2, label=model)
            if name == "reward_mean":
                low = [w["quantiles"]["p05"] for w in windows]
                high = [w["quantiles"]["p95"] for w in windows]
                axis.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("window")
    axes.flat[0].legend(fontsize=8)
    some = next(iter(chosen.values()))
    fig.suptitle(f"run {series['id']}: windows of {some['window']} inputs")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return list(chosen)
