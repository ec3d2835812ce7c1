"""Scoring candidates through running servers with the client library, resumable, in bounded memory.

Each target's scores go to ``<out>/scores/<label>.jsonl``: a header line ``{"label", "spec",
"fingerprint"}``, then one line a prompt, ``{"id": str, "scores": [float, ...]}`` (candidate order). A
second run reads those files and scores only the prompts they miss; a file whose header names another
target is refused, and a torn last line (a run cut off mid-write) is dropped. Targets that share URL,
model and options are scored by the same requests: one request per prompt, holding its n candidates
(so ``tradeoff_scope=request`` takes its worst head over one prompt's candidates), at most
``concurrency`` requests in flight, candidates read one prompt at a time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from rmserve.lab.candidates import Candidates, iter_candidates
from rmserve.lab.targets import Target
from rmserve_client import (
    AsyncRewardClient,
    ModelInfo,
    RewardClientError,
    RewardConnectionError,
    RewardServerError,
)

SCORES_DIR = "scores"
THROUGHPUT_FILE = "throughput.jsonl"  # one line a scoring run of a group: what it scored, in how long


class LabError(RuntimeError):
    """A server could not be reached, refused the lab's requests, or answered badly."""


@dataclass
class GroupStats:
    """What scoring one group of targets took."""

    labels: list[str]
    url: str
    prompts: int = 0
    inputs: int = 0
    input_tokens: int = 0
    seconds: float = 0.0

    @property
    def inputs_per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.input_tokens / self.seconds if self.seconds else 0.0


def score_file(scores_dir: Path, target: Target) -> Path:
    """Where a target's scores are cached."""
    return scores_dir / f"{target.label}.jsonl"


def read_scores(path: Path, target: Target) -> dict[str, list[float]]:
    """The cached scores of a target (prompt id -> scores); empty when there is no file yet.

    Raises:
        ValueError: the file belongs to another target.
    """
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("fingerprint") != target.fingerprint:
        raise ValueError(
            f"{path} holds the scores of {header.get('spec', 'another target')!r}, not of {target.spec!r}; give "
            f"this target another label or another --out folder."
        )
    scores: dict[str, list[float]] = {}
    for number, line in enumerate(lines[1:], 2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # torn by a cut-off run: drop it, and rewrite the file without it
                path.write_text("".join(lines[:-1]), encoding="utf-8")
                break
            raise ValueError(
                f"{path}:{number} is not JSON; delete the file to score that target again."
            ) from None
        scores[record["id"]] = [float(v) for v in record["scores"]]
    return scores


def cache_header(target: Target) -> str:
    """The first line of a target's score cache: what it holds the scores of."""
    return json.dumps({"label": target.label, "spec": target.spec, "fingerprint": target.fingerprint}) + "\n"


def _open_cache(path: Path, target: Target) -> Any:
    fresh = not path.is_file()
    f = path.open("a", encoding="utf-8")
    if fresh:
        f.write(cache_header(target))
        f.flush()
    return f


def check_served(models: Sequence[ModelInfo], targets: Sequence[Target]) -> None:
    """Refuse a model the server does not serve, or an aggregate that model does not offer.

    Raises:
        LabError: the message lists what the server offers.
    """
    by_name = {m.id: m for m in models}
    for target in targets:
        if target.model is None:
            model = next((m for m in models if m.default), None)
        else:
            model = by_name.get(target.model)
            if model is None:
                raise LabError(
                    f"{target.label}: {target.url} serves no model {target.model!r}; it serves {', '.join(by_name)}."
                )
        if (
            model is not None
            and target.aggregate
            and model.aggregates
            and target.aggregate not in model.aggregates
        ):
            raise LabError(
                f"{target.label}: model {model.id!r} at {target.url} offers the aggregates "
                f"{', '.join(model.aggregates)}, not {target.aggregate!r}."
            )


async def _served_models(client: AsyncRewardClient, url: str) -> list[ModelInfo] | None:
    try:
        return await client.models()
    except RewardConnectionError as exc:
        raise LabError(
            f"cannot reach {url}: {exc}. Start the server (rmserve serve ...) or fix the URL."
        ) from None
    except RewardServerError:
        return None  # a /v1/score-compatible server without GET /v1/models: nothing to check up front


async def check_group(
    targets: Sequence[Target], timeout: float, transport: httpx.AsyncBaseTransport | None = None
) -> None:
    """Refuse an unreachable server, or a model or aggregate it does not serve.

    Raises:
        LabError: the message says which target and why.
    """
    url, model, _ = targets[0].group
    try:
        async with AsyncRewardClient(
            url, model=model, timeout=timeout, max_retries=1, transport=transport
        ) as client:
            served = await _served_models(client, url)
    except RewardClientError as exc:
        raise LabError(f"{url}: {exc}") from None
    if served is not None:
        check_served(served, targets)


async def _score_group(
    targets: Sequence[Target],
    candidates: Path,
    scores_dir: Path,
    *,
    concurrency: int = 4,
    timeout: float = 600.0,
    progress: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> GroupStats:
    """Score every candidate for targets of one group (same URL, model and options), resuming their files;
    ``score_all`` has checked the server (``check_group``) before.

    Raises:
        LabError: the server is unreachable, refuses a request, or answers with the wrong number of scores.
        ValueError: a cache file belongs to another target; the candidates file is malformed.
    """
    url, model, options = targets[0].group
    stats = GroupStats([t.label for t in targets], url)
    scores_dir.mkdir(parents=True, exist_ok=True)
    cached = [read_scores(score_file(scores_dir, t), t) for t in targets]
    done = set.intersection(*(set(c) for c in cached))
    files: list[Any] = []  # opened once the server has answered, so that a wrong URL leaves no file
    aggregates = sorted({t.aggregate for t in targets if t.aggregate})
    kwargs: dict[str, Any] = dict(options)
    bar = tqdm(desc=", ".join(stats.labels), unit="prompt", disable=not progress)
    try:
        async with AsyncRewardClient(
            url,
            model=model,
            timeout=timeout,
            max_concurrency=concurrency,
            chunk_size=4096,
            transport=transport,
        ) as client:
            files.extend(_open_cache(score_file(scores_dir, t), t) for t in targets)
            slots = asyncio.Semaphore(concurrency)
            pending: set[asyncio.Task[None]] = set()
            started = time.monotonic()

            async def one(record: Candidates) -> None:
                try:
                    n = len(record.responses)
                    result = await client.score(
                        [record.prompt] * n, record.responses, aggregates=aggregates or None, **kwargs
                    )
                    for target, todo, f in zip(targets, cached, files, strict=True):
                        values = (
                            result.rewards
                            if target.aggregate is None
                            else result.aggregates.get(target.aggregate)
                        )
                        if values is None or len(values) != n:
                            raise LabError(
                                f"{url} answered {target.label} for {record.id} without {n} scores."
                            )
                        if record.id not in todo:
                            f.write(json.dumps({"id": record.id, "scores": values}) + "\n")
                            f.flush()
                    stats.prompts += 1
                    stats.inputs += n
                    stats.input_tokens += result.input_tokens
                    bar.update(1)
                finally:
                    slots.release()

            for record in iter_candidates(candidates):
                if record.id in done:
                    continue
                await slots.acquire()
                task = asyncio.create_task(one(record))
                pending.add(task)
                task.add_done_callback(pending.discard)
                failed = [t for t in pending if t.done() and t.exception() is not None]
                if failed:
                    break
            results = await asyncio.gather(*pending, return_exceptions=True)
            stats.seconds = time.monotonic() - started
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
    except RewardConnectionError as exc:
        raise LabError(
            f"cannot reach {url}: {exc}. Start the server (rmserve serve ...) or fix the URL."
        ) from None
    except RewardServerError as exc:
        raise LabError(f"{url} refused a request for {', '.join(stats.labels)}: {exc}") from None
    except RewardClientError as exc:
        raise LabError(f"{url}: {exc}") from None
    finally:
        bar.close()
        for f in files:
            f.close()
    return stats


def score_all(
    targets: Sequence[Target],
    candidates: Path,
    scores_dir: Path,
    *,
    concurrency: int = 4,
    timeout: float = 600.0,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[GroupStats]:
    """Score every group of targets in turn (one server busy at a time), skipping the groups whose caches
    already hold every candidate (their servers need not run); ``transport``: an httpx transport for every
    client (tests pass ``httpx.MockTransport``)."""
    groups: dict[Any, list[Target]] = defaultdict(list)
    for target in targets:
        groups[target.group].append(target)
    ids = {record.id for record in iter_candidates(candidates)}
    finished = [
        key
        for key, members in groups.items()
        if all(ids <= set(read_scores(score_file(scores_dir, t), t)) for t in members)
    ]
    for key in finished:  # every score already cached: no server needed, none asked
        echo(f"{', '.join(t.label for t in groups.pop(key))}: every candidate already scored in {scores_dir}")
    for members in groups.values():  # every server checked before any is kept busy
        asyncio.run(check_group(members, timeout, transport))
    stats = []
    for members in groups.values():
        result = asyncio.run(
            _score_group(
                members,
                candidates,
                scores_dir,
                concurrency=concurrency,
                timeout=timeout,
                progress=progress,
                transport=transport,
            )
        )
        if result.prompts:
            with (scores_dir / THROUGHPUT_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(result)) + "\n")
            echo(
                f"{', '.join(result.labels)}: {result.inputs} candidates of {result.prompts} prompts in "
                f"{result.seconds:.0f}s ({result.inputs_per_second:.1f} candidates/s, "
                f"{result.tokens_per_second:.0f} tokens/s)"
            )
        stats.append(result)
    return stats


def read_throughput(scores_dir: Path) -> list[dict[str, Any]]:
    """Every group's scoring runs summed (a resumed group has several): prompts, inputs, tokens, seconds, rates."""
    path = scores_dir / THROUGHPUT_FILE
    totals: dict[tuple[str, ...], GroupStats] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        run = GroupStats(**json.loads(line))
        total = totals.setdefault(tuple(run.labels), GroupStats(run.labels, run.url))
        total.prompts += run.prompts
        total.inputs += run.inputs
        total.input_tokens += run.input_tokens
        total.seconds += run.seconds
    return [
        asdict(t) | {"inputs_per_second": t.inputs_per_second, "tokens_per_second": t.tokens_per_second}
        for t in totals.values()
    ]


def collect_scores(targets: Sequence[Target], candidates: Path, scores_dir: Path) -> list[dict[str, Any]]:
    """One raw-scores record a prompt, in candidates order: id, lengths and every target's scores.

    Raises:
        LabError: a prompt was not scored for some target (run the scoring again).
    """
    cached = {t.label: read_scores(score_file(scores_dir, t), t) for t in targets}
    records = []
    for record in iter_candidates(candidates):
        scores = {}
        for label, values in cached.items():
            if record.id not in values:
                raise LabError(
                    f"{label} has no scores for prompt {record.id}; run `rmserve lab bon` again to finish."
                )
            scores[label] = values[record.id]
        records.append(
            {
                "id": record.id,
                "response_tokens": record.response_tokens,
                "response_chars": [len(r) for r in record.responses],
                "scores": scores,
            }
        )
    return records
