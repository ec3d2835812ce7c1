"""DMoERM-w/o-Outer on HH-RLHF: the ``demo-dmoerm`` recipe, its labellers' agreement and its held-out accuracy.

Builds ``demo-dmoerm`` (``rmserve.training.recipes.demo_dmoerm``: four local capability labellers, then
DMoERM's three phases on the fixed split's 1,850 training pairs, from the ``demo`` reward model) and
writes, into ``docs/dmoerm.md``: each labeller's agreement with the human labels (training and held-out
pairs), the accuracy after each phase, and the held-out accuracy of the whole model as served, beside
the dense, ensemble (branched multihead) and BRME (branched) models ``bench/training_hh.py`` trained on
the same split (its ``results.json``). The layer 0-27 states cached by ``bench/training_hh.py`` are
reused when present (same inputs, same truncation), so that only the top layers are computed.

    python bench/dmoerm_hh.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --out docs/dmoerm.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from report import machine, read_section, write_section  # bench/report.py: run as python bench/dmoerm_hh.py

from rmserve.config import Settings
from rmserve.training.recipes.demo_dmoerm import LABELS_REPORT, RECIPE, build_dmoerm_demo
from rmserve.training.trainer import PrefixMemo

ROOT = Path(__file__).resolve().parents[1]
COMMAND = (
    "python bench/dmoerm_hh.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --out docs/dmoerm.md"
)


def pct(value: float) -> str:
    return "n/a" if value != value else f"{value:.1%}"


def section(folder: Path, baselines: dict[str, Any]) -> str:
    record = json.loads((folder / "training.json").read_text())
    labels = json.loads((folder / LABELS_REPORT).read_text())
    results = record["results"]
    (category,) = results["categories"].values()
    held = results["held_out"]
    lines = [
        "## DMoERM-w/o-Outer on HH-RLHF (`bench/dmoerm_hh.py`)",
        "",
        f"Machine: {machine()}. No GPU; float32. Recipe: `rmserve.demo.build.DMOERM_RECIPE` "
        f"(`rmserve demo build-dmoerm`); labelling took {labels['label_seconds'] / 60:.1f} min and training "
        f"{record['seconds'] / 60:.1f} min.",
        "",
        "```",
        COMMAND,
        "```",
        "",
        "Capability labels from local labellers (no LLM API here): agreement is the share of a labeller's "
        "decided pairs (ties excluded) on which it prefers the human-chosen response.",
        "",
        "| point | labeller | train: decided / pairs | train agreement | held-out: decided / pairs | held-out agreement (s.e.) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for train, test in zip(labels["train"], labels["held_out"], strict=True):
        source = train["source"] if not train["source"].startswith("reward:") else "reward:demo"
        lines.append(
            f"| {train['point']} | `{source}` | {train['labelled']} / {train['pairs']} | {pct(train['agreement'])} | "
            f"{test['labelled']} / {test['pairs']} | {pct(test['agreement'])} ({pct(test['standard_error'])}) |"
        )
    lines += [
        "",
        f"Held-out accuracy on the {held['pairs']} held-out pairs (standard error in brackets):",
        "",
        "| model | held-out accuracy |",
        "| --- | ---: |",
        f"| DMoERM phase 1 (the task base: top-2 fine-tune on 60%) | {pct(category['phase_1']['accuracy'])} ({pct(category['phase_1']['standard_error'])}) |",
    ]  # fmt: skip
    for name, expert in category["experts"].items():
        human = expert["human_held_out"]
        lines.append(
            f"| DMoERM expert `{name}` (its own head) | {pct(human['accuracy'])} ({pct(human['standard_error'])}) |"
        )
    lines.append(
        f"| **DMoERM-w/o-Outer, as served** (MLP over the 4 experts) | **{pct(held['accuracy'])}** ({pct(held['standard_error'])}) |"
    )
    if baselines:
        probe = baselines.get("top-2", {}).get("probe")
        if probe is not None:
            lines.append(f"| `demo` (frozen probe) | {pct(probe)} |")
        for name, label in (("top-2", "dense: top-2 fine-tune"), ("lora", "dense: LoRA r16")):
            if name in baselines:
                lines.append(
                    f"| {label} | {pct(baselines[name]['accuracy'])} ({pct(baselines[name]['standard_error'])}) |"
                )
        for name, label, aggregates in (
            ("branched-multihead", "ensemble: branched multihead k=4", ("mean", "min", "uwo")),
            ("branched-brme", "BRME: branched k=4", ("nominal", "tradeoff")),
        ):
            if name in baselines:
                row = baselines[name]
                cells = ", ".join(f"{a} {pct(row['aggregates'][a])}" for a in aggregates)
                lines.append(f"| {label} | {cells} ({pct(row['standard_error'])}) |")
        lines.append("")
        lines.append(
            "The dense, ensemble and BRME rows are `bench/training_hh.py`'s ([benchmarks.md](benchmarks.md)), on "
            "the same split and truncation."
        )
    lines += [
        "",
        "A standard error is about 2.3 points here, so a difference under about 6.4 points (two standard "
        "errors of a difference) does not tell two models apart.",
    ]
    return "\n".join(lines) + "\n"


def committed_baselines(report: Path, pairs: int) -> dict[str, Any]:
    """``bench/training_hh.py``'s figures as its section in ``report`` holds them (its ``results.json``
    lives in a cache that a fresh machine lacks); branched rows get the standard error of their mean."""
    text = read_section(report, "bench/training_hh.py")
    if text is None:
        return {}
    out: dict[str, Any] = {}
    header: list[str] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0].startswith("---"):
            continue
        if cells[0] in ("model", "branched model"):
            header = cells
            continue
        values = {
            h: float(c[:-1]) / 100
            for h, c in zip(header, cells, strict=False)
            if c.endswith("%") and "," not in c
        }
        if cells[0].startswith("`demo`"):
            out.setdefault("top-2", {})["probe"] = values["held-out accuracy"]
        elif header[0] == "model":
            out.setdefault(cells[0], {}).update(
                accuracy=values["held-out accuracy"], standard_error=values["s.e."]
            )
        else:
            p = values["mean"]
            out[cells[0]] = {"aggregates": values, "standard_error": (p * (1 - p) / pairs) ** 0.5}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="The HH-RLHF harmless-base test file.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dmoerm.md")
    args = parser.parse_args()
    settings = Settings()
    hh = settings.cache_dir / "training-hh"
    memo_file = hh / "prefix-states.pt"
    memo: PrefixMemo = torch.load(memo_file, weights_only=True) if memo_file.is_file() else {}
    known = len(memo)
    folder = build_dmoerm_demo(settings.cache_dir, args.data, memo=memo)
    if len(memo) > known:  # the states computed here serve bench/training_hh.py's runs too
        hh.mkdir(parents=True, exist_ok=True)
        torch.save(memo, memo_file)
    baselines_file = hh / "results.json"
    pairs = json.loads((folder / "training.json").read_text())["results"]["held_out"]["pairs"]
    if baselines_file.is_file():
        baselines = json.loads(baselines_file.read_text())
    else:
        baselines = committed_baselines(ROOT / "docs" / "benchmarks.md", pairs)
    text = section(folder, baselines)
    print(text)
    print(json.dumps(RECIPE, indent=2))
    write_section(args.out, "bench/dmoerm_hh.py", text)


if __name__ == "__main__":
    main()
