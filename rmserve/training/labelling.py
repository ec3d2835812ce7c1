"""``rmserve dmoerm label``: capability labels for DMoERM's phase 2, from a judge or from local labellers.

Two sources, any mix of them in one run, each giving every pair a verdict per capability point
(``chosen``, ``rejected``, ``tie``, or none):

- an LLM judge over any OpenAI-compatible endpoint, the paper's protocol (``training.judge``);
- local labellers, functions of a pair (``PairLabeller``), named on the command line as
  ``POINT=SPEC``. Built in:

  - ``refusal``: the response with more refusal phrases (``REFUSAL_PHRASES``) is better; equal counts tie;
  - ``toxicity``: the response with fewer toxic words (``TOXIC_WORDS``, whole words) is better;
  - ``fluency`` (or ``fluency:PATH``): the reply with the higher mean token log-probability under the
    demo policy (SmolLM2-135M-Instruct as a language model; or the causal LM folder at ``PATH``), given
    the query, is better;
  - ``reward:PATH``: the reward model folder at ``PATH`` (any kind rmserve serves, run in-process in
    float32) prefers the response it scores higher.

Every verdict is appended to a cache as it is made (chunks of 64 pairs), keyed by the labeller and the
pair, so an interrupted run resumes. The run writes the input file again with each pair's
``capabilities`` merged in (lists are left as they are: labels compare two responses) and a report:
per capability point, how many pairs got a label, and how often the label agrees with the human
ranking (the share of labelled pairs labelled ``chosen``), with its standard error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from rmserve.batching.planning import BatchLimits, plan_offline
from rmserve.config import LoadOptions
from rmserve.lab.generate import load_policy, prompt_ids
from rmserve.models.base import reward_values
from rmserve.models.loader import load_model
from rmserve.names import CPU_JOIN_PADDING
from rmserve.training.fitting import binomial_interval
from rmserve.training.judge import JudgeOptions, judge_labels, pair_texts
from rmserve.training.ranked import RankedItem, Verdict, ranked_item, read_records, write_records

CHUNK = 64
REFUSAL_PHRASES = (
    "i'm sorry", "i am sorry", "i apologize", "i can't", "i cannot", "i won't", "i will not", "i'm not able",
    "i am not able", "i'm not comfortable", "i don't feel comfortable", "i'd rather not", "i would rather not",
    "not appropriate", "inappropriate", "not okay", "not ok", "illegal", "against the law", "unethical",
    "harmful", "dangerous", "please don't", "you shouldn't", "you should not", "i don't think that's",
    "i do not recommend", "i wouldn't recommend", "seek help", "professional help",
)  # fmt: skip
TOXIC_WORDS = (
    "fuck", "fucking", "shit", "bitch", "bastard", "asshole", "damn", "crap", "idiot", "stupid", "dumb",
    "moron", "kill", "killing", "murder", "stab", "shoot", "gun", "guns", "bomb", "explosive", "poison",
    "steal", "stealing", "rob", "robbery", "drugs", "cocaine", "heroin", "meth", "weapon", "weapons",
    "hate", "racist", "rape", "torture", "hurt", "beat", "revenge", "cheat", "porn", "slut", "whore",
)  # fmt: skip
LABELLER_LIMITS = BatchLimits(8192, 64, CPU_JOIN_PADDING)  # the server's CPU defaults
BUILT_IN = ("refusal", "toxicity", "fluency", "fluency:PATH", "reward:PATH")


class PairLabeller(Protocol):
    """A local labeller: a verdict per pair (None: no opinion), in order; lists are never passed."""

    def __call__(self, items: Sequence[RankedItem]) -> list[Verdict | None]: ...


def compare(better_first: float, better_second: float) -> Verdict:
    """``chosen`` when the first response's score is higher, ``rejected`` when lower, ``tie`` when equal."""
    if better_first > better_second:
        return "chosen"
    if better_first < better_second:
        return "rejected"
    return "tie"


def _replies(item: RankedItem) -> tuple[str, str] | None:
    texts = pair_texts(item)
    return None if texts is None else (texts[1], texts[2])


class LexiconLabeller:
    """Counts lexicon hits in each reply: more is better (``more_is_better``) or worse."""

    def __init__(self, phrases: Sequence[str], *, more_is_better: bool, whole_words: bool) -> None:
        words = (rf"\b{re.escape(p)}\b" if whole_words else re.escape(p) for p in phrases)
        self.pattern = re.compile("|".join(words), re.IGNORECASE)
        self.sign = 1 if more_is_better else -1

    def hits(self, text: str) -> int:
        return len(self.pattern.findall(text))

    def __call__(self, items: Sequence[RankedItem]) -> list[Verdict | None]:
        out: list[Verdict | None] = []
        for item in items:
            replies = _replies(item)
            out.append(None if replies is None else compare(*(self.sign * self.hits(r) for r in replies)))
        return out


class FluencyLabeller:
    """The reply with the higher mean token log-probability under a causal LM, given the query, is better."""

    def __init__(self, policy: str = "demo", max_tokens: int = 256) -> None:
        self.model, self.tokenizer = load_policy(policy, torch.float32)
        self.max_tokens = max_tokens

    @torch.no_grad()
    def mean_logprob(self, query: str, reply: str) -> float:
        prompt = prompt_ids(self.tokenizer, query)[-self.max_tokens :]  # the query as the policy is prompted
        reply_ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"][: self.max_tokens]
        if not reply_ids:
            return float("-inf")
        ids = torch.tensor([prompt + reply_ids])  # (1, P + R)
        logits = self.model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1]  # (R, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return float(logprobs[torch.arange(len(reply_ids)), torch.tensor(reply_ids)].mean())

    def __call__(self, items: Sequence[RankedItem]) -> list[Verdict | None]:
        out: list[Verdict | None] = []
        for item in items:
            texts = pair_texts(item)
            if texts is None:
                out.append(None)
                continue
            query, chosen, rejected = texts
            out.append(compare(self.mean_logprob(query, chosen), self.mean_logprob(query, rejected)))
        return out


class RewardLabeller:
    """A reward model's preference: the response it scores higher is better."""

    def __init__(self, path: Path) -> None:
        self.model = load_model("labeller", path, LoadOptions(dtype="float32", device="cpu"))
        self.encoder = self.model.new_encoder()

    def __call__(self, items: Sequence[RankedItem]) -> list[Verdict | None]:
        pairs = [item for item in items if len(item.responses) == 2]
        if not pairs:
            return [None] * len(items)
        encoded = self.encoder.encode_many([r for item in pairs for r in item.responses])
        values: list[float] = [0.0] * len(encoded)
        for batch in plan_offline(
            [len(e) for e in encoded], LABELLER_LIMITS
        ):  # by length: padding is loss on CPU
            for index, value in zip(
                batch, reward_values(self.model, [encoded[i] for i in batch]), strict=True
            ):
                values[index] = value
        rewards = iter(values)
        return [compare(next(rewards), next(rewards)) if len(item.responses) == 2 else None for item in items]


def build_labeller(spec: str) -> PairLabeller:
    """The local labeller a spec names (``BUILT_IN``).

    Raises:
        ValueError: an unknown spec, or a reward folder that does not load.
    """
    if spec == "refusal":
        return LexiconLabeller(REFUSAL_PHRASES, more_is_better=True, whole_words=False)
    if spec == "toxicity":
        return LexiconLabeller(TOXIC_WORDS, more_is_better=False, whole_words=True)
    if spec == "fluency":
        return FluencyLabeller()
    if spec.startswith("fluency:") and spec != "fluency:":
        return FluencyLabeller(spec.removeprefix("fluency:"))
    if spec.startswith("reward:") and spec != "reward:":
        return RewardLabeller(Path(spec.removeprefix("reward:")))
    raise ValueError(f"unknown local labeller {spec!r}; built in: {', '.join(BUILT_IN)}.")


def parse_local(text: str) -> tuple[str, str]:
    """``POINT=SPEC`` as (point, spec).

    Raises:
        ValueError: no ``=``, or an empty side.
    """
    point, sep, spec = text.partition("=")
    if not sep or not point.strip() or not spec.strip():
        raise ValueError(f"--local takes POINT=LABELLER (e.g. harmless=refusal), got {text!r}.")
    return point.strip(), spec.strip()


def _pair_key(spec: str, item: RankedItem) -> str:
    return hashlib.sha256(
        json.dumps([spec, item.prompt, list(item.texts)], sort_keys=True).encode()
    ).hexdigest()


def local_labels(items: Sequence[RankedItem], spec: str, cache: Path, progress: bool) -> list[Verdict | None]:
    """Each pair's verdict from one local labeller, chunk by chunk, cached (the labeller is built only if needed)."""
    known: dict[str, Verdict | None] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                known[row["key"]] = row["verdict"]
            except (ValueError, KeyError, TypeError):
                continue
    keys = [_pair_key(spec, item) for item in items]
    todo = [
        i
        for i, (item, key) in enumerate(zip(items, keys, strict=True))
        if key not in known and len(item.responses) == 2
    ]
    if todo:
        built = build_labeller(spec)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("a", encoding="utf-8") as f:
            for start in tqdm(range(0, len(todo), CHUNK), desc=spec, disable=not progress):
                chunk = todo[start : start + CHUNK]
                for i, found in zip(chunk, built([items[i] for i in chunk]), strict=True):
                    known[keys[i]] = found
                    f.write(json.dumps({"key": keys[i], "verdict": found}) + "\n")
                f.flush()
    return [known.get(key) for key in keys]


@dataclass(frozen=True)
class PointReport:
    """One capability point's labels: how many pairs got one, and their agreement with the human ranking."""

    point: str
    source: str
    pairs: int
    labelled: int
    ties: int
    agreement: float
    standard_error: float


def report_point(point: str, source: str, verdicts: Sequence[Verdict | None]) -> PointReport:
    """Coverage and agreement (share labelled ``chosen`` among ``chosen`` / ``rejected`` labels)."""
    decided = [v for v in verdicts if v in ("chosen", "rejected")]
    ties = sum(v == "tie" for v in verdicts)
    if not decided:
        return PointReport(point, source, len(verdicts), 0, ties, float("nan"), float("nan"))
    interval = binomial_interval(sum(v == "chosen" for v in decided), len(decided))
    return PointReport(
        point, source, len(verdicts), len(decided), ties, interval.value, interval.standard_error
    )


def format_reports(reports: Sequence[PointReport]) -> str:
    """The report as a text table."""
    lines = [
        f"{'point':<16} {'source':<28} {'pairs':>6} {'labelled':>9} {'ties':>6} {'agreement':>10} {'s.e.':>6}"
    ]
    for r in reports:
        lines.append(
            f"{r.point:<16} {r.source[:28]:<28} {r.pairs:>6} {r.labelled:>9} {r.ties:>6} {r.agreement:>10.4f} {r.standard_error:>6.4f}"
        )
    return "\n".join(lines)


def label_file(
    data: Path,
    out: Path,
    *,
    judge: JudgeOptions | None = None,
    points: Sequence[str] = (),
    local: Sequence[tuple[str, str]] = (),
    cache_dir: Path,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    transport: Any = None,
) -> list[PointReport]:
    """Label ``data``'s pairs and write ``out`` (with ``capabilities``) and ``out``'s report (``.report.json``).

    Raises:
        ValueError: nothing to label with, a point named twice, or a malformed input line.
        JudgeError: the judge failed (answers so far stay cached).
    """
    if judge is None and not local:
        raise ValueError(
            "give a judge (--judge-url, --judge-model, --point) or local labellers (--local POINT=LABELLER)."
        )
    if judge is not None and not points:
        raise ValueError("a judge labels the capability points you name: add --point NAME (repeatable).")
    named = [*(points if judge else ()), *(point for point, _ in local)]
    if len(set(named)) != len(named):
        raise ValueError(
            f"each capability point takes one source; named twice: {sorted({p for p in named if named.count(p) > 1})}."
        )
    records = read_records(data)
    items: list[RankedItem] = []
    for number, record in records:
        try:
            items.append(ranked_item(record))
        except ValueError as exc:
            raise ValueError(f"{data}:{number}: {exc}") from None
    pairs = [i for i, item in enumerate(items) if len(item.responses) == 2]
    echo(f"{len(pairs)} pairs to label ({len(items) - len(pairs)} lists left as they are)")
    found: dict[str, list[Verdict | None]] = {}
    sources: dict[str, str] = {}
    if judge is not None:
        labels = asyncio.run(
            judge_labels(
                items, points, judge, cache_dir / "judge.jsonl", progress=progress, transport=transport
            )
        )
        for point in points:
            found[point] = [labels[i].get(point) for i in range(len(items))]
            sources[point] = f"judge {judge.model}"
    for point, spec in local:
        digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
        found[point] = local_labels(items, spec, cache_dir / f"local-{digest}.jsonl", progress)
        sources[point] = spec
    labelled = []
    is_pair = set(pairs)
    for i, (_, record) in enumerate(records):
        if i in is_pair:
            new = {point: verdicts[i] for point, verdicts in found.items() if verdicts[i] is not None}
            record = {**record, "capabilities": {**record.get("capabilities", {}), **new}}
        labelled.append(record)
    write_records(out, labelled)
    reports = [report_point(point, sources[point], [found[point][i] for i in pairs]) for point in found]
    report_path = out.with_name(out.name.removesuffix(".gz").removesuffix(".jsonl") + ".report.json")
    report_path.write_text(json.dumps([r.__dict__ for r in reports], indent=2) + "\n")
    echo(format_reports(reports))
    echo(f"wrote {out} and {report_path}")
    return reports
