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

A condition whose report is committed is extended, not redone (``--fresh`` redoes it): ``rmserve lab bon
--reuse docs/lab/<condition>`` copies the scores of the targets the report holds, so only the proxies it
lacks are trained, served and scored, and their results join its ``proxies.json``. Before that, the
gold is checked against the report: its scores of the first eval prompts must match the committed ones
(the candidates are checked by ``--reuse``, and the training pairs against the committed setup).

The candidates are committed in ``docs/lab/candidates/`` (generation is deterministic: the same settings
and seed give the same tokens) and copied into the work folder, where ``rmserve lab generate`` checks
their settings and skips their chunks. Work (candidates, proxies, score caches) lives in
``~/.cache/rmserve/lab``; ``--conditions`` picks the runs.
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
from rmserve.lab.candidates import iter_candidates
from rmserve.lab.evaluate import read_raw
from rmserve.lab.targets import parse_target
from rmserve.launch import CLEAN_EXIT, start_server
from rmserve_client import RewardClient

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {
    "1800-noise25": (1800, 0.25),
    "1800-noise0": (1800, 0.0),
    "500-noise25": (500, 0.25),
    "500-noise0": (500, 0.0),
}
PROXIES = ("dense", "dense-bsr", "ensemble", "brme", "moe", "merged", "dmoerm")
SETUP = ("pairs", "held_out", "noise", "flipped", "ties", "seed")  # what makes two proxies.json comparable
GOLD_CHECK_PROMPTS = 8
# bfloat16 serving on the reports' path: the same gold scores the first 8 eval prompts (512 candidates) a mean
# 0.0010 from its committed scores (99.96% of their orderings kept; single scores up to 0.11 apart, as batch
# composition moves bfloat16 sums); with prefix sharing on, the same weights are a mean 0.055 apart
GOLD_TOLERANCE = 0.01
# the path the committed reports were scored on: bfloat16 scores depend on it (prefix sharing and packed rows
# attend through a masked kernel), so a report is extended on the same one
SERVE_SETTINGS = {"dtype": "bfloat16", "prefix_min_tokens": 0, "max_packed_tokens": 0}


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
        lines.append(f"| {name} | {accuracy(proxies['results'][name])} | {proxies['seconds'][name]:.0f} |")
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
        + f". Proxy training {sum(proxies['seconds'][n] for n in PROXIES) / 60:.0f} min."
    )
    if curves.get("reused"):
        lines += ["", f"Scores of {', '.join(curves['reused'])} were copied from the report committed before "
                  f"(`rmserve lab bon --reuse`); their rows below are that run's throughput."]  # fmt: skip
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
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="Redo a condition whose report is committed instead of extending it.",
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
        if (args.docs / "candidates" / split / "generation.json").is_file() and not out.exists():
            shutil.copytree(args.docs / "candidates" / split, out)  # committed: generate skips them
        rmserve("lab", "generate", "--prompts", str(work / "prompts" / f"{split}.jsonl"), "--out", str(out), "--n", str(n), *common)  # fmt: skip
        return out

    train_candidates = generate("train", 4)
    base = build_backbone(Settings().cache_dir)
    for condition in args.conditions:
        run_condition(condition, args, work, train_candidates, base, generate)


def needed_proxies(wanted: list[str], committed: Path | None) -> list[str]:
    """The proxies to train and serve: those of targets the committed report (if any) did not score alike."""
    specs = json.loads((committed / "bon.json").read_text())["targets"] if committed else {}
    models = set()
    for text in wanted:
        target = parse_target(text)
        if target.label not in specs or parse_target(specs[target.label]).fingerprint != target.fingerprint:
            models.add(target.model)
    if "merged" in models:
        models.add("moe")  # merged merges the moe proxy
    return [name for name in PROXIES if name in models]


def check_gold(url: str, eval_candidates: Path, committed: Path) -> float:
    """The mean difference between the served gold and the committed report's gold scores over the first
    eval prompts; exits when it is beyond ``GOLD_TOLERANCE`` (the report's scores would not be this gold's)."""
    committed_scores = {r["id"]: r["scores"]["gold"] for r in read_raw(committed / "raw-scores.jsonl.gz")}
    differences: list[float] = []
    with RewardClient(url, model="gold", timeout=600) as client:
        for i, record in enumerate(iter_candidates(eval_candidates)):
            if i == GOLD_CHECK_PROMPTS:
                break
            rewards = client.score([record.prompt] * len(record.responses), record.responses).rewards
            differences += [abs(a - b) for a, b in zip(rewards, committed_scores[record.id], strict=True)]
    mean = sum(differences) / len(differences)
    if mean > GOLD_TOLERANCE:
        sys.exit(
            f"the gold scores {GOLD_CHECK_PROMPTS} eval prompts a mean {mean:.4f} away from {committed} (at most "
            f"{max(differences):.3f}): it is not the gold of that report. Run with --fresh to redo the condition."
        )
    return mean


def merge_record(committed: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The committed proxies.json with the new proxies' results; refused when the setups differ."""
    differ = [key for key in SETUP if committed[key] != new[key]]
    if differ:
        sys.exit(
            f"the training pairs differ from the committed report's ({', '.join(differ)}): the gold or the "
            f"candidates changed. Run with --fresh to redo the condition."
        )
    return committed | {
        "recipes": committed["recipes"] | new["recipes"],
        "results": committed["results"] | new["results"],
        "seconds": committed["seconds"] | new["seconds"],
    }


def run_condition(
    condition: str, args: argparse.Namespace, work: Path, train_candidates: Path, base: Path, generate: Any
) -> None:
    """Train, serve and score one condition (extending its committed report unless ``--fresh``)."""
    pairs, noise = CONDITIONS[condition]
    docs = args.docs / condition
    committed = docs if (docs / "bon.json").is_file() and not args.fresh else None
    proxies = work / f"proxies-{condition}"
    wanted = targets("http://127.0.0.1:1", args.targets)
    needed = needed_proxies(wanted, committed)
    if not needed:
        print(f"{condition}: the committed report holds every target; nothing to do", flush=True)
        return
    models = [{"name": "gold", "path": str(args.gold)}]
    models += [{"name": name, "path": str(proxies / name)} for name in needed]
    config = work / f"serve-{condition}.yaml"
    config.write_text(yaml.safe_dump({**SERVE_SETTINGS, "models": models}))
    gold_only = work / "serve-gold.yaml"
    gold_only.write_text(yaml.safe_dump({**SERVE_SETTINGS, "models": models[:1]}))
    eval_candidates = generate("eval", 64)
    if any(not (proxies / name / "training.json").is_file() for name in needed):
        server = start_server(["--config", str(gold_only)], work / "serve-gold.log")
        try:
            if committed:
                print(f"gold check: a mean {check_gold(server.url, eval_candidates, committed):.4f} from {committed}", flush=True)  # fmt: skip
            rmserve("lab", "train-proxies", "--candidates", str(train_candidates), "--gold", f"{server.url}:gold",
                    "--base", str(base), "--out", str(proxies), "--pairs", str(pairs), "--noise", str(noise),
                    "--only", ",".join(needed), "--no-progress")  # fmt: skip
        finally:
            assert server.stop() == CLEAN_EXIT
    record = json.loads((proxies / "proxies.json").read_text())
    if committed:
        record = merge_record(json.loads((committed / "proxies.json").read_text()), record)
    report = work / f"bon-{condition}"
    server = start_server(["--config", str(config)], work / f"serve-{condition}.log", ready_timeout=900)
    started = time.monotonic()
    try:
        if committed:
            print(f"gold check: a mean {check_gold(server.url, eval_candidates, committed):.4f} from {committed}", flush=True)  # fmt: skip
        proxy_flags = [flag for target in targets(server.url, args.targets) for flag in ("--proxy", target)]
        reuse = ["--reuse", str(committed)] if committed else []
        rmserve("lab", "bon", "--candidates", str(eval_candidates), "--gold", f"{server.url}:gold",
                *proxy_flags, "--out", str(report), "--concurrency", "4", "--no-progress", *reuse)  # fmt: skip
    finally:
        assert server.stop() == CLEAN_EXIT
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("bon.md", "bon.png", "bon.json", "raw-scores.jsonl.gz"):
        shutil.copy(report / name, docs / name)
    (docs / "proxies.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"{condition}: report in {docs} ({time.monotonic() - started:.0f}s of scoring)", flush=True)
    write_section(
        ROOT / "docs" / "overoptimization.md", f"bench/lab_hh.py {condition}", section(condition, docs, work)
    )


if __name__ == "__main__":
    main()
