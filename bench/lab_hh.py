"""The over-optimisation experiment on HH-RLHF, end to end and resumable: every step skips what is done.

    python bench/lab_hh.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz

1. ``rmserve lab prompts``: 200 eval and 1,000 proxy-training prompts (first user turns, split by prompt);
2. ``rmserve lab generate``: 4 samples per training prompt from SmolLM2-135M-Instruct (ancestral,
   temperature 1, at most 48 new tokens, bfloat16, seed 0);
3. the gold: ``bench/training_hh.py``'s ``top-2`` (the demo with its top 2 layers fine-tuned on the 1,850
   HH train pairs), served by ``rmserve serve`` (bfloat16);
4. ``rmserve lab train-proxies`` for each condition (pairs, label noise) from the demo's backbone;
5. ``rmserve lab generate``: 64 samples per eval prompt, with the same settings;
6. ``rmserve lab bon``: gold and every proxy through the server; the report goes to ``docs/lab/<condition>/``
   and the summary to ``docs/overoptimization.md``.

Work (candidates, proxies, score caches) lives in ``~/.cache/rmserve/lab``; ``--conditions`` picks the runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from report import write_section  # bench/report.py: run as python bench/lab_hh.py

from rmserve.config import Settings
from rmserve.demo.build import build_backbone
from rmserve.launch import CLEAN_EXIT, start_server

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {
    "1800-noise25": (1800, 0.25),
    "1800-noise0": (1800, 0.0),
    "500-noise25": (500, 0.25),
    "500-noise0": (500, 0.0),
}
PROXIES = ("dense", "dense-bsr", "ensemble", "brme", "moe", "merged", "dmoerm")


def targets(url: str, which: str) -> list[str]:
    """The proxies scored (``core``: the first eleven; ``all``), cheapest groups first; targets that share
    model and options share requests, so every group past ``core`` costs a whole pass of one model."""
    brme = f"{url}:brme"
    every = [
        f"dense={url}:dense",
        f"ensemble-mean={url}:ensemble:mean",
        f"ensemble-min={url}:ensemble:min",
        f"ensemble-uwo={url}:ensemble:uwo",
        f"brme-nominal={brme}:nominal?tradeoff_lambda=0.4",
        f"brme-mean={brme}:mean?tradeoff_lambda=0.4",
        f"brme-tradeoff-0.4={brme}:tradeoff?tradeoff_lambda=0.4",
        f"moe={url}:moe",
        f"merged={url}:merged",
        f"dense-bsr={url}:dense-bsr",
        f"dmoerm={url}:dmoerm",
        f"brme-tradeoff-0.4-request={brme}:tradeoff?tradeoff_lambda=0.4&tradeoff_scope=request",
        f"brme-tradeoff-0.6={brme}:tradeoff?tradeoff_lambda=0.6",
        f"brme-tradeoff-0.6-request={brme}:tradeoff?tradeoff_lambda=0.6&tradeoff_scope=request",
    ]
    return every[:11] if which == "core" else every


def accuracy(results: dict[str, Any]) -> str:
    """A proxy's held-out accuracy against the gold, from its training record's results."""
    if "held_out_accuracy" in results:
        return f"{results['held_out_accuracy']:.1%}"
    if "held_out" in results and "aggregates" not in results["held_out"]:  # dmoerm: as served
        return f"{results['held_out']['accuracy']:.1%}"
    if "held_out" in results:  # branched: per aggregate
        aggregates = results["held_out"]["aggregates"]
        return ", ".join(
            f"{name} {aggregates[name]:.1%}" for name in ("mean", "min", "uwo", "nominal", "tradeoff")
        )
    return f"{results['history'][-1]['held_out_accuracy']:.1%}"  # merged


def section(condition: str, docs: Path, work: Path) -> str:
    """The results of one condition, for docs/overoptimization.md."""
    pairs, noise = CONDITIONS[condition]
    proxies = json.loads((docs / "proxies.json").read_text())
    curves = json.loads((docs / "bon.json").read_text())
    lines = [f"### {pairs:,} gold-labelled pairs, {noise:.0%} label noise", ""]
    lines += ["Held-out accuracy against the gold (200 pairs with the gold's true labels):", ""]
    lines += ["| proxy | held-out accuracy | training seconds |", "| --- | --- | ---: |"]
    for name in PROXIES:
        record = json.loads((work / f"proxies-{condition}" / name / "training.json").read_text())
        lines.append(f"| {name} | {accuracy(proxies['results'][name])} | {record['seconds']:.0f} |")
    lines += [
        "",
        (docs / "bon.md").read_text().strip(),
        "",
        f"![best-of-n]({docs.relative_to(ROOT / 'docs')}/bon.png)",
        "",
    ]
    generation = [
        json.loads((work / f"candidates-{split}" / "generation.json").read_text())
        for split in ("train", "eval")
    ]
    lines.append(
        "Compute (2-core CPU): generation "
        + "; ".join(
            f"{g['prompts']} prompts x {g['settings']['sampling']['n']}: {g['tokens']:,} tokens in {g['seconds'] / 60:.0f} min ({g['tokens_per_second']:.0f} tokens/s)"
            for g in generation
        )
        + f". Proxy training {sum(json.loads((work / f'proxies-{condition}' / n / 'training.json').read_text())['seconds'] for n in PROXIES) / 60:.0f} min."
    )
    lines += [
        "",
        "Scoring through the server (the lab as a load test; one request per prompt, 64 candidates, 4 in flight):",
        "",
    ]
    lines += [
        "| targets | candidates | seconds | candidates/s | tokens/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for group in curves["throughput"]:
        lines.append(
            f"| {', '.join(group['labels'])} | {group['inputs']:,} | {group['seconds']:.0f} | "
            f"{group['inputs_per_second']:.1f} | {group['tokens_per_second']:.0f} |"
        )
    lines += ["", f"Raw scores: `{docs.relative_to(ROOT)}/raw-scores.jsonl.gz`; recompute the table with "
              f"`rmserve lab bon --from-scores {docs.relative_to(ROOT)}/raw-scores.jsonl.gz --out /tmp/bon`."]  # fmt: skip
    return "\n".join(lines)


def rmserve(*args: str) -> None:
    command = [sys.executable, "-m", "rmserve", *args]
    print("$ rmserve " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="The HH-RLHF harmless-base test split.")
    parser.add_argument("--work", type=Path, default=Settings().cache_dir / "lab")
    parser.add_argument("--gold", type=Path, default=Settings().cache_dir / "training-hh" / "top-2")
    parser.add_argument("--conditions", nargs="+", default=["1800-noise25"], choices=list(CONDITIONS))
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "lab")
    parser.add_argument(
        "--targets", choices=["core", "all"], default="all", help="core: all but brme's extra settings."
    )
    args = parser.parse_args()
    work: Path = args.work
    if not (args.gold / "training.json").is_file():
        sys.exit(
            f"no gold at {args.gold}: run `python bench/training_hh.py --data {args.data} --only top-2` first."
        )
    if not (work / "prompts" / "eval.jsonl").is_file():
        rmserve("lab", "prompts", "--data", str(args.data), "--out", str(work / "prompts"))
    common = ["--max-new-tokens", "48", "--dtype", "bfloat16", "--seed", "0", "--no-progress"]

    def generate(split: str, n: int) -> Path:
        out = work / f"candidates-{split}"
        rmserve("lab", "generate", "--prompts", str(work / "prompts" / f"{split}.jsonl"), "--out", str(out), "--n", str(n), *common)  # fmt: skip
        return out

    train_candidates = generate("train", 4)
    base = build_backbone(Settings().cache_dir)
    for condition in args.conditions:
        pairs, noise = CONDITIONS[condition]
        proxies = work / f"proxies-{condition}"
        models = [{"name": "gold", "path": str(args.gold)}]
        models += [{"name": name, "path": str(proxies / name)} for name in PROXIES]
        config = work / f"serve-{condition}.yaml"
        config.write_text(yaml.safe_dump({"dtype": "bfloat16", "models": models}))
        gold_only = work / "serve-gold.yaml"
        gold_only.write_text(yaml.safe_dump({"dtype": "bfloat16", "models": models[:1]}))
        if any(not (proxies / name / "training.json").is_file() for name in PROXIES):
            server = start_server(["--config", str(gold_only)], work / "serve-gold.log")
            try:
                rmserve("lab", "train-proxies", "--candidates", str(train_candidates), "--gold", f"{server.url}:gold",
                        "--base", str(base), "--out", str(proxies), "--pairs", str(pairs), "--noise", str(noise), "--no-progress")  # fmt: skip
            finally:
                assert server.stop() == CLEAN_EXIT
        eval_candidates = generate("eval", 64)
        report = work / f"bon-{condition}"
        server = start_server(["--config", str(config)], work / f"serve-{condition}.log", ready_timeout=900)
        started = time.monotonic()
        try:
            proxy_flags = [
                flag for target in targets(server.url, args.targets) for flag in ("--proxy", target)
            ]
            rmserve("lab", "bon", "--candidates", str(eval_candidates), "--gold", f"{server.url}:gold",
                    *proxy_flags, "--out", str(report), "--concurrency", "4", "--no-progress")  # fmt: skip
        finally:
            assert server.stop() == CLEAN_EXIT
        docs = args.docs / condition
        docs.mkdir(parents=True, exist_ok=True)
        for name in ("bon.md", "bon.png", "bon.json", "raw-scores.jsonl.gz"):
            shutil.copy(report / name, docs / name)
        shutil.copy(proxies / "proxies.json", docs / "proxies.json")
        print(f"{condition}: report in {docs} ({time.monotonic() - started:.0f}s of scoring)", flush=True)
        write_section(
            ROOT / "docs" / "overoptimization.md",
            f"bench/lab_hh.py {condition}",
            section(condition, docs, work),
        )


if __name__ == "__main__":
    main()
