"""``rmserve lab train-proxies``: proxy reward models trained on gold-labelled pairs of policy samples.

The synthetic-gold protocol (Gao et al.; Coste et al.): the gold reward model is the truth by
construction. Each proxy-training prompt's candidates are paired in order, (0, 1), (2, 3), ...; the gold
(scored through its server, cached like ``rmserve lab bon``'s scores) labels each pair, the higher
reward being ``chosen`` (exact ties are dropped). The pairs are shuffled (seeded); ``held_out`` of them
are kept aside with their true labels (each proxy's held-out accuracy against the gold), the next
``pairs`` train, and each training label is flipped with probability ``noise`` (seeded), the label noise
of Coste et al. ``pairs.jsonl`` (TRL's prompt / chosen / rejected) and ``held-out.jsonl`` record them.

Every proxy starts from the same ``base`` (a dense decoder reward model) and is trained with the fixed
recipes of ``RECIPES`` (hyper-parameters chosen before any best-of-n result was seen). The ``dmoerm``
proxy's capability labels come from local labellers (``DMOERM_LABELLERS``: refusal, toxicity, fluency),
never from the gold, which is the truth the proxies are measured against. Layers below
the top two are the base's in every recipe, so their outputs are computed once for all (a shared memo).
A proxy whose folder already holds its training record is kept (resumable); ``proxies.json`` gathers
the setup, each proxy's held-out accuracy and its training seconds.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmserve.lab.candidates import iter_candidates
from rmserve.lab.scoring import SCORES_DIR, read_scores, score_all, score_file
from rmserve.lab.targets import Target
from rmserve.models.inputs import PromptResponse
from rmserve.names import HeadKind
from rmserve.training.branches import BranchOptions, train_branches
from rmserve.training.dmoerm import DmoermOptions, train_dmoerm
from rmserve.training.labelling import local_labels
from rmserve.training.merge import merge
from rmserve.training.pairs import PreferenceExample
from rmserve.training.ranked import RankedItem, Verdict
from rmserve.training.trainer import PrefixMemo, TrainOptions, train
from rmserve.training.upcycle import upcycle

RECORD_FILE = "proxies.json"
GOLD_LABEL = "gold"
COMMON: dict[str, Any] = {"max_length": 256, "batch_size": 8, "epochs": 2, "lr": 1e-4, "seed": 0}
DENSE = TrainOptions(trainable="top:2", bsr=0.0, **COMMON)
DENSE_BSR = TrainOptions(trainable="top:2", bsr=1.6e-2, **COMMON)  # the BSR paper's effective strength
BRANCHES = 4
MOE: dict[str, Any] = {
    "experts": 4,
    "top_k": 2,
    "last": 2,
    "seed": 0,
    "bsr": 1e-3,
    "aux": 1e-2,
    "shared_rate": 0.5,
}


DMOERM_LABELLERS = {
    "harmless": "refusal",
    "clean": "toxicity",
    "fluent": "fluency",
}  # never the gold: it is the truth
DMOERM = DmoermOptions(
    top=2, epochs=COMMON["epochs"], phase1_lr=COMMON["lr"], expert_lr=2e-4, max_length=COMMON["max_length"],
    batch_size=COMMON["batch_size"], seed=COMMON["seed"], capabilities=tuple(DMOERM_LABELLERS),
)  # fmt: skip


@dataclass(frozen=True)
class LabelledPairs:
    """Gold-labelled pairs: the noisy training pairs and the held-out pairs with their true labels."""

    train: list[PreferenceExample]
    held_out: list[PreferenceExample]
    flipped: int
    ties: int


def _example(prompt: str, better: str, worse: str) -> PreferenceExample:
    return PreferenceExample(
        PromptResponse(prompt=prompt, response=better), PromptResponse(prompt=prompt, response=worse)
    )


def gold_pairs(
    candidates: Path, gold_scores: dict[str, list[float]], pairs: int, held_out: int, noise: float, seed: int
) -> LabelledPairs:
    """Pair each prompt's candidates in order, label by the gold, split, and add label noise to training.

    Raises:
        ValueError: fewer usable pairs than ``pairs + held_out``, or ``noise`` outside [0, 0.5).
    """
    if not 0 <= noise < 0.5:
        raise ValueError(f"--noise must lie in [0, 0.5) (0.5 would be pure noise), got {noise}.")
    found: list[PreferenceExample] = []
    ties = 0
    for record in iter_candidates(candidates):
        scores = gold_scores.get(record.id)
        if scores is None:
            raise ValueError(f"the gold has no scores for prompt {record.id}; score the candidates first.")
        for a in range(0, len(record.responses) - 1, 2):
            b = a + 1
            if scores[a] == scores[b]:
                ties += 1
                continue
            hi, lo = (a, b) if scores[a] > scores[b] else (b, a)
            found.append(_example(record.prompt, record.responses[hi], record.responses[lo]))
    if len(found) < pairs + held_out:
        raise ValueError(
            f"{candidates} gives {len(found)} gold-labelled pairs, fewer than --pairs {pairs} + --held-out "
            f"{held_out}; generate more proxy-training candidates or ask for fewer pairs."
        )
    rng = random.Random(seed)
    rng.shuffle(found)
    held, chosen = found[:held_out], found[held_out : held_out + pairs]
    train_pairs, flipped = [], 0
    for example in chosen:
        if rng.random() < noise:
            example = PreferenceExample(example.rejected, example.chosen)
            flipped += 1
        train_pairs.append(example)
    return LabelledPairs(train_pairs, held, flipped, ties)


def write_pairs(path: Path, examples: Sequence[PreferenceExample]) -> None:
    """Pairs as TRL's JSONL (``prompt``, ``chosen``, ``rejected``)."""
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            assert isinstance(e.chosen, PromptResponse) and isinstance(e.rejected, PromptResponse)
            row = {"prompt": e.chosen.prompt, "chosen": e.chosen.response, "rejected": e.rejected.response}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class Run:
    """What every recipe trains with: the base, the labelled pairs, the shared prefix memo, reporting."""

    base: Path
    data: LabelledPairs
    memo: PrefixMemo
    progress: bool
    echo: Callable[[str], None]

    def train(self, model_dir: Path, out: Path, options: TrainOptions) -> None:
        train(model_dir, self.data.train, self.data.held_out, out, options, progress=self.progress,
              echo=self.echo, memo=self.memo)  # fmt: skip


def _dense(run: Run, out: Path) -> None:
    run.train(run.base, out, DENSE)


def _dense_bsr(run: Run, out: Path) -> None:
    run.train(run.base, out, DENSE_BSR)


def _branches(run: Run, out: Path, kind: HeadKind) -> None:
    branch = BranchOptions(kind=kind, branches=BRANCHES, share=0.5)
    train_branches(run.base, run.data.train, run.data.held_out, out, DENSE, branch, progress=run.progress,
                   echo=run.echo, memo=run.memo)  # fmt: skip


def _ensemble(run: Run, out: Path) -> None:
    _branches(run, out, "multihead")


def _brme(run: Run, out: Path) -> None:
    _branches(run, out, "brme")


def _moe(run: Run, out: Path) -> None:
    upcycled = out.with_name(out.name + ".upcycled")
    shutil.rmtree(upcycled, ignore_errors=True)
    upcycle(
        run.base, upcycled, experts=MOE["experts"], top_k=MOE["top_k"], last=MOE["last"], seed=MOE["seed"]
    )
    run.train(upcycled, out, TrainOptions(trainable="experts", bsr=MOE["bsr"], aux=MOE["aux"], **COMMON))
    shutil.rmtree(upcycled)


def _dmoerm(run: Run, out: Path) -> None:
    items = [_ranked(e) for e in run.data.train]
    labelled = []
    verdicts = {
        point: local_labels(items, spec, out.with_name(out.name + ".labels") / f"{point}.jsonl", run.progress)
        for point, spec in DMOERM_LABELLERS.items()
    }
    for i, item in enumerate(items):
        found: dict[str, Verdict] = {}
        for point, v in verdicts.items():
            if (verdict := v[i]) is not None:
                found[point] = verdict
        labelled.append(dataclasses.replace(item, capabilities=found))
    for point, v in verdicts.items():
        run.echo(
            f"capability {point} ({DMOERM_LABELLERS[point]}): {sum(x in ('chosen', 'rejected') for x in v)} of {len(v)} pairs decided"
        )
    train_dmoerm(run.base, labelled, [_ranked(e) for e in run.data.held_out], out, DMOERM,
                 progress=run.progress, echo=run.echo, memo=run.memo)  # fmt: skip


def _ranked(example: PreferenceExample) -> RankedItem:
    assert isinstance(example.chosen, PromptResponse) and isinstance(example.rejected, PromptResponse)
    texts = (example.chosen.response, example.rejected.response)
    return RankedItem((example.chosen, example.rejected), example.chosen.prompt, texts)


def _merged(run: Run, out: Path) -> None:  # merges the moe proxy beside it
    merge(out.with_name("moe"), out, shared_rate=MOE["shared_rate"], train_pairs=run.data.train,
          eval_pairs=run.data.held_out, epochs=1, lr=0.05, max_length=COMMON["max_length"],
          progress=run.progress, echo=run.echo, memo=run.memo)  # fmt: skip


RECIPES: dict[str, Callable[[Run, Path], None]] = {
    "dense": _dense,
    "dense-bsr": _dense_bsr,
    "ensemble": _ensemble,
    "brme": _brme,
    "moe": _moe,
    "merged": _merged,  # after moe, which it merges
    "dmoerm": _dmoerm,
}


RECIPE_NAMES = tuple(RECIPES)


def held_out_accuracy(folder: Path) -> Any:
    """The held-out results a training record holds (per epoch for trained models)."""
    record = json.loads((folder / "training.json").read_text())
    return record.get("results", record.get("evaluation"))


def train_proxies(
    candidates: Path,
    gold: Target,
    base: Path,
    out: Path,
    *,
    pairs: int,
    held_out: int = 200,
    noise: float = 0.0,
    seed: int = 0,
    only: Sequence[str] = RECIPE_NAMES,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Label pairs with the gold, then train every proxy of ``only`` into ``out/<name>``.

    Raises:
        LabError: the gold's server is unreachable or answers badly.
        ValueError: too few pairs, a bad noise level, or an unknown recipe.
        FileNotFoundError: the candidates or the base are missing.
    """
    unknown = [name for name in only if name not in RECIPE_NAMES]
    if unknown:
        raise ValueError(f"unknown proxies {', '.join(unknown)}; choose from {', '.join(RECIPE_NAMES)}.")
    if "merged" in only and "moe" not in only and not (out / "moe" / "training.json").is_file():
        raise ValueError("the merged proxy merges the moe proxy: train moe too (or first).")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"--base {base}: no config.json there; pass a dense reward-model folder.")
    gold = Target(GOLD_LABEL, gold.url, gold.model, gold.aggregate, gold.options)
    out.mkdir(parents=True, exist_ok=True)
    score_all([gold], candidates, out / SCORES_DIR, progress=progress, echo=echo)
    data = gold_pairs(
        candidates, read_scores(score_file(out / SCORES_DIR, gold), gold), pairs, held_out, noise, seed
    )
    write_pairs(out / "pairs.jsonl", data.train)
    write_pairs(out / "held-out.jsonl", data.held_out)
    echo(
        f"{len(data.train)} training pairs ({data.flipped} labels flipped), {len(data.held_out)} held out, {data.ties} ties dropped"
    )
    run = Run(base, data, {}, progress, echo)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name in RECIPE_NAMES:
        folder = out / name
        if name in only and not (folder / "training.json").is_file():
            echo(f"== proxy {name}")
            shutil.rmtree(folder, ignore_errors=True)  # a run cut off before its record starts again
            RECIPES[name](run, folder)
        if (folder / "training.json").is_file():  # trained now or by an earlier run
            results[name] = held_out_accuracy(folder)
            seconds[name] = json.loads((folder / "training.json").read_text())["seconds"]
    record = {
        "candidates": str(candidates),
        "gold": gold.spec,
        "base": str(base),
        "pairs": len(data.train),
        "held_out": len(data.held_out),
        "noise": noise,
        "flipped": data.flipped,
        "ties": data.ties,
        "seed": seed,
        "recipes": {
            "dense": vars(DENSE) | {"lora": None},
            "dense-bsr": vars(DENSE_BSR) | {"lora": None},
            "ensemble": {"branches": BRANCHES, "share": 0.5, "options": "dense"},
            "brme": {"branches": BRANCHES, "share": 0.5, "options": "dense"},
            "moe": MOE | COMMON,
            "merged": {"shared_rate": MOE["shared_rate"], "epochs": 1, "lr": 0.05},
            "dmoerm": {"labellers": DMOERM_LABELLERS, "options": DMOERM},
        },
        "results": results,
        "seconds": seconds,
    }
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
