"""The best-of-n report: a markdown table, a PNG plot and the curves as JSON.

The table gives, per proxy, the gold reward of the best-of-n pick at n = 1, 4, 16, 64, 256 (those up to
the candidate count, and the count itself) with 95% bootstrap intervals over prompts, then at the largest
n the proxy's own score of its pick and the pick's length. The plot draws gold reward (left) and proxy
score (right) against KL(best-of-n || policy) = log n - (n - 1) / n.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from rmserve.lab.bon import Curve, Point, kl_bon

TABLE_NS = (1, 4, 16, 64, 256)


def _cell(point: Point) -> str:
    return f"{point.mean:.3f} [{point.low:.3f}, {point.high:.3f}]"


def table_ns(ns: Sequence[int]) -> list[int]:
    """The n the table shows: ``TABLE_NS`` that the curves reach, and their largest n."""
    shown = [n for n in TABLE_NS if n in ns]
    return shown if ns[-1] in shown else [*shown, ns[-1]]


def markdown_table(curves: Sequence[Curve], length_unit: str) -> str:
    """The table of gold reward per proxy and n (see the module docstring)."""
    ns = table_ns(curves[0].ns)
    top = curves[0].ns[-1]
    head = [f"gold at n = {n}" for n in ns] + [
        f"proxy score at n = {top}",
        f"length at n = {top} ({length_unit})",
    ]
    lines = ["| proxy | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(head)]
    for curve in curves:
        at = {n: i for i, n in enumerate(curve.ns)}
        cells = [_cell(curve.gold[at[n]]) for n in ns]
        cells += [_cell(curve.proxy_score[-1]), f"{curve.length[-1].mean:.1f}"]
        lines.append(f"| {curve.proxy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: Sequence[Curve], path: Path, title: str, oracle: str | None = None) -> None:
    """Gold reward and proxy score of the pick against KL, one line a proxy (gold with its interval); each
    proxy its own colour (tab20 past ten), the ``oracle`` curve (the gold picking for itself) black, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    proxies = [c for c in curves if c.proxy != oracle]
    palette = plt.get_cmap("tab10" if len(proxies) <= 10 else "tab20")
    colours = {c.proxy: palette(i % palette.N) for i, c in enumerate(proxies)}
    for curve in curves:
        kl = [kl_bon(n) for n in curve.ns]
        style = (
            {"color": "black", "linestyle": "--"}
            if curve.proxy == oracle
            else {"color": colours[curve.proxy]}
        )
        left.plot(kl, [p.mean for p in curve.gold], marker="o", markersize=3, label=curve.proxy, **style)
        left.fill_between(
            kl, [p.low for p in curve.gold], [p.high for p in curve.gold], color=style["color"], alpha=0.12
        )
        right.plot(
            kl, [p.mean for p in curve.proxy_score], marker="o", markersize=3, label=curve.proxy, **style
        )
    left.set(xlabel="KL(best-of-n || policy), nats", ylabel="gold reward of the pick", title="gold reward")
    right.set(xlabel="KL(best-of-n || policy), nats", ylabel="proxy's score of its pick", title="proxy score")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_curves(curves: Sequence[Curve], path: Path, extra: dict[str, object]) -> None:
    """The curves (and ``extra``: settings, throughput) as JSON."""
    body = {"curves": [asdict(c) | {"kl": [kl_bon(n) for n in c.ns]} for c in curves], **extra}
    path.write_text(json.dumps(body, indent=1) + "\n")
