"""The run monitor on the over-optimisation lab's data: best-of-n picks replayed as one run.

    python bench/monitor_lab.py --report docs/lab/1800-noise25 --out docs/monitor.md

For each proxy (``dense``, ``ensemble-mean``), n = 1, 2, 4, ..., 64 and ``--draws`` seeded draws per n:
each of the 200 eval prompts draws n of its 64 candidates (uniformly, without replacement) and keeps the
one the proxy scores highest. The 200 picks of one (n, draw) are one window of one run, in order of n,
fed to ``rmserve.monitor.RunMonitor`` (the server's own code; ``window`` = 200, the first ``--draws``
windows, n = 1, are the baseline). The scores are the ones the lab recorded
(``raw-scores.jsonl.gz``: every candidate under the gold and every proxy, and its length in tokens); no
model runs. Heads: the ensemble's four branch rewards are not recorded, but their population variance is
``mean - uwo`` (UWO with the branch model's default lambda, 1), so each pick's disagreement is
``sqrt(mean - uwo)``; the dense proxy has one head, hence no disagreement.

The gap each window is compared with is the over-optimisation the lab measured on those picks: the rise
of the proxy's mean score from the n = 1 windows, minus the gold's, each in units of its standard
deviation over all candidates. Reported per signal: Spearman's correlation with the gap over the windows,
and how far the signal moves from n = 1 to n = 64 in units of its spread between draws at n = 1 (a
monitoring signal is only readable if the move exceeds that noise). In this run the gap grows with n and
never turns over, so a signal that grows with n correlates with it whatever it measures: these are
descriptions of the signals on this data, not evidence of early warning.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from report import write_section  # bench/report.py: run as python bench/monitor_lab.py

from rmserve.monitor import RunMonitor, Scored, spearman

ROOT = Path(__file__).resolve().parents[1]
NS = (1, 2, 4, 8, 16, 32, 64)
PROXIES = {"dense": None, "ensemble-mean": "ensemble-uwo"}  # proxy -> the aggregate giving its variance
SHOWN = ("reward_mean", "reward_std", "disagreement", "length_mean", "length_spearman", "saturation")


def read(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def replay(
    records: list[dict[str, Any]], proxy: str, variance_of: str | None, draws: int, seed: int
) -> list[dict[str, Any]]:
    """The windows of one proxy's run, each with its n, draw, the gold and proxy means of its picks."""
    rng = np.random.default_rng(seed)
    monitor = RunMonitor(window=len(records), max_runs=1, max_windows=len(NS) * draws, baseline_windows=draws)
    meta = []
    for n in NS:
        for draw in range(draws):
            picks, gold, proxy_scores = [], [], []
            for record in records:
                scores = np.asarray(record["scores"][proxy])  # (N,)
                chosen = rng.choice(len(scores), size=n, replace=False)
                best = int(chosen[np.argmax(scores[chosen])])
                heads: tuple[float, ...] = ()
                if variance_of is not None:
                    variance = max(0.0, scores[best] - record["scores"][variance_of][best])
                    spread = math.sqrt(variance)
                    heads = (scores[best] - spread, scores[best] + spread)  # population std = spread
                picks.append(Scored(float(scores[best]), int(record["response_tokens"][best]), heads))
                gold.append(record["scores"]["gold"][best])
                proxy_scores.append(float(scores[best]))
            monitor.record(proxy, proxy, picks)
            meta.append(
                {
                    "n": n,
                    "draw": draw,
                    "gold": statistics.fmean(gold),
                    "proxy": statistics.fmean(proxy_scores),
                }
            )
    series = monitor.series(proxy)
    assert series is not None
    windows = series["models"][proxy]["windows"]
    return [w | m for w, m in zip(windows, meta, strict=True)]


def gaps(windows: list[dict[str, Any]], records: list[dict[str, Any]], proxy: str) -> list[float]:
    """Per window: the proxy's rise over the n = 1 windows minus the gold's, each in its candidates' std."""
    every_proxy = [v for r in records for v in r["scores"][proxy]]
    every_gold = [v for r in records for v in r["scores"]["gold"]]
    base = [w for w in windows if w["n"] == 1]
    p0, g0 = statistics.fmean(w["proxy"] for w in base), statistics.fmean(w["gold"] for w in base)
    sp, sg = statistics.pstdev(every_proxy), statistics.pstdev(every_gold)
    return [(w["proxy"] - p0) / sp - (w["gold"] - g0) / sg for w in windows]


def movement(windows: list[dict[str, Any]], name: str) -> float | None:
    """(mean at n = 64 - mean at n = 1) / std between the n = 1 draws."""
    first = [w[name] for w in windows if w["n"] == NS[0] and w[name] is not None]
    last = [w[name] for w in windows if w["n"] == NS[-1] and w[name] is not None]
    if len(first) < 2 or not last:
        return None
    noise = statistics.stdev(first)
    return None if noise == 0 else (statistics.fmean(last) - statistics.fmean(first)) / noise


def plot(results: dict[str, tuple[list[dict[str, Any]], list[float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    panels = ("gap", *SHOWN, "gold")
    for axis, name in zip(axes.flat, panels, strict=True):
        for proxy, (windows, gap) in results.items():
            values = gap if name == "gap" else [w[name] for w in windows]
            x = [math.log2(w["n"]) + 0.08 * (w["draw"] - 1) for w in windows]
            axis.scatter(x, [np.nan if v is None else v for v in values], s=10, label=proxy)
        axis.set_title(
            {"gap": "proxy-gold gap (std units)", "gold": "gold reward of the picks"}.get(name, name),
            fontsize=10,
        )
        axis.set_xticks(range(len(NS)), [str(n) for n in NS])
        axis.set_xlabel("n (best-of-n)")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("run monitor on best-of-n picks replayed as one run (windows of 200 picks; HH-RLHF lab)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "lab" / "1800-noise25")
    parser.add_argument(
        "--draws", type=int, default=3, help="Seeded draws of the n-subsets per n (windows per n)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="Write the results section into this markdown file."
    )
    args = parser.parse_args()
    args.report = args.report.resolve()
    args.out = args.out.resolve() if args.out is not None else None
    records = read(args.report / "raw-scores.jsonl.gz")
    if any(p not in records[0]["scores"] for p in [*PROXIES, *filter(None, PROXIES.values())]):
        sys.exit(f"{args.report}: the raw scores lack one of {', '.join(PROXIES)} (or ensemble-uwo).")
    results = {}
    for proxy, variance_of in PROXIES.items():
        windows = replay(records, proxy, variance_of, args.draws, args.seed)
        results[proxy] = (windows, gaps(windows, records, proxy))
    figure = ROOT / "docs" / "monitor" / "lab-replay.png"
    plot(results, figure)
    lines = [
        f"`python bench/monitor_lab.py --report {args.report.relative_to(ROOT)} --draws {args.draws} --seed {args.seed}"
        + (f" --out {args.out.relative_to(ROOT)}`" if args.out else "`"),
        "",
        f"{len(records)} prompts x 64 candidates; {args.draws} draws per n; windows of {len(records)} picks. Per signal: "
        "Spearman's correlation with the proxy-gold gap over the windows, and its move from n = 1 to n = 64 in "
        "units of its spread between the n = 1 draws.",
        "",
        "| proxy | gap at n = 64 | " + " | ".join(SHOWN) + " |",
        "| --- | ---: |" + " --- |" * len(SHOWN),
    ]
    for proxy, (windows, gap) in results.items():
        last_gap = statistics.fmean(g for g, w in zip(gap, windows, strict=True) if w["n"] == NS[-1])
        cells = []
        for name in SHOWN:
            defined = [(w[name], g) for w, g in zip(windows, gap, strict=True) if w[name] is not None]
            if len(defined) < 3:
                cells.append("n/a")
                continue
            rho = spearman([v for v, _ in defined], [g for _, g in defined])
            move = movement(windows, name)
            cell = f"rho {rho:+.2f}" if rho is not None else "rho n/a"
            cell += f", move {move:+.1f}" if move is not None else ""
            missing = len(windows) - len(defined)
            cells.append(cell + (f" ({missing} of {len(windows)} windows undefined)" if missing else ""))
        lines.append(f"| {proxy} | {last_gap:.2f} | " + " | ".join(cells) + " |")
    lines += ["", f"![monitor signals on the replayed best-of-n run]({figure.relative_to(ROOT / 'docs')})"]
    section = "\n".join(lines)
    print(section)
    if args.out is not None:
        write_section(args.out, "bench/monitor_lab.py", section)


if __name__ == "__main__":
    main()
