"""Capability labels from an LLM judge: ``rmserve dmoerm label --judge-url``.

DMoERM's protocol (section 4.3, appendix B.2): for each response pair and capability point, any
OpenAI-compatible chat endpoint (``POST {url}/chat/completions``) is asked the paper's English prompt
(its Table 14, without the dialogue history)::

    Given a query and two responses, determine which of Response 1 and Response 2 is better in terms of
    [{point}].

    [Query]: {query}

    [Response 1]: {response1}

    [Response 2]: {response2}

twice, with the two responses swapped. The judge's choice is whichever of the digits 1 and 2 appears
first in its answer (the paper's rule). A pair gets a label only when both answers pick the same
response (``chosen`` or ``rejected``, relative to the human ranking); position-inconsistent or
unreadable answers leave the pair unlabelled for that point, which is also the paper's data cleaning.

Requests run ``concurrency`` at a time; a 429, a 5xx or a transport error is retried up to
``max_retries`` times with exponential backoff (honouring ``Retry-After``, capped); any other 4xx stops
the run with the endpoint's message. Every answer is appended to a JSONL cache keyed by the judge model
and the exact prompt as it arrives, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from rmserve.training.ranked import RankedItem, Verdict

TEMPLATE = (
    "Given a query and two responses, determine which of Response 1 and Response 2 is better in terms of "
    "[{point}].\n\n[Query]: {query}\n\n[Response 1]: {response1}\n\n[Response 2]: {response2}"
)
MAX_BACKOFF_S = 30.0


class JudgeError(RuntimeError):
    """The judge endpoint refused or failed a request past its retries; the message says what to fix."""


@dataclass(frozen=True)
class JudgeOptions:
    """Where the judge is and how to call it.

    Attributes:
        url: the endpoint's base URL, up to and including ``/v1`` (``{url}/chat/completions`` is called).
        model: the judge model's name, as the endpoint knows it.
        api_key: sent as ``Authorization: Bearer``; None: no header.
        concurrency: requests in flight at once.
        max_retries: retries of one request after a 429, a 5xx or a transport error.
        timeout_s: one request's timeout.
        max_tokens: the answer's token cap.
        backoff_s: the first retry's wait (doubling after each).
    """

    url: str
    model: str
    api_key: str | None = None
    concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 120.0
    max_tokens: int = 256
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--judge-url must be an http(s) URL ending in /v1, got {self.url!r}.")
        if self.concurrency < 1 or self.max_retries < 0:
            raise ValueError("--concurrency must be at least 1 and --max-retries at least 0.")


def last_turn(value: Any, role: str) -> str | None:
    """The text of a prompt or response as given: a string itself, else the content of its last ``role`` turn."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        turns = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == role]
        return turns[-1] if turns and isinstance(turns[-1], str) else None
    return None


def pair_texts(item: RankedItem) -> tuple[str, str, str] | None:
    """(query, chosen reply, rejected reply) as the judge sees them; None for a list or an unsplittable pair.

    The query is the prompt's last user turn (the paper attaches no history); with an implicit prompt
    (whole conversations as chosen and rejected), the chosen conversation's last user turn.
    """
    if len(item.texts) != 2:
        return None
    chosen, rejected = (last_turn(text, "assistant") for text in item.texts)
    if item.prompt is not None:
        query = last_turn(item.prompt, "user")
    elif isinstance(item.texts[0], list):
        query = last_turn(item.texts[0], "user")
    else:
        return None  # two formatted texts: no query to pull out
    if query is None or chosen is None or rejected is None:
        return None
    return query, chosen, rejected


def judge_prompt(point: str, query: str, first: str, second: str) -> str:
    """The paper's prompt for one order of the two responses."""
    return TEMPLATE.format(point=point, query=query, response1=first, response2=second)


def choice(answer: str | None) -> int | None:
    """1 or 2: whichever digit appears first in the answer (None: neither does)."""
    found = re.search(r"[12]", answer or "")
    return int(found.group()) if found else None


def verdict(forward: str | None, swapped: str | None) -> Verdict | None:
    """The label of a pair from its two answers: forward shows chosen as Response 1, swapped as Response 2."""
    a, b = choice(forward), choice(swapped)
    if (a, b) == (1, 2):
        return "chosen"
    if (a, b) == (2, 1):
        return "rejected"
    return None


class AnswerCache:
    """The judge's answers by (model, prompt), appended to a JSONL file as they arrive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answers: dict[str, str] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.answers[row["key"]] = row["answer"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interrupted run: asked again
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    @staticmethod
    def key(model: str, prompt: str) -> str:
        return hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()

    def add(self, key: str, answer: str) -> None:
        self.answers[key] = answer
        self._file.write(json.dumps({"key": key, "answer": answer}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


async def ask(client: httpx.AsyncClient, options: JudgeOptions, prompt: str) -> str:
    """One chat completion's text, retried on 429, 5xx and transport errors.

    Raises:
        JudgeError: another 4xx, an answer without text, or the retries ran out.
    """
    body = {
        "model": options.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.0,
        "max_tokens": options.max_tokens,
    }
    url = options.url.rstrip("/") + "/chat/completions"
    failure = ""
    for attempt in range(options.max_retries + 1):
        wait = min(MAX_BACKOFF_S, options.backoff_s * 2**attempt)
        try:
            response = await client.post(url, json=body)
        except httpx.TransportError as exc:
            failure = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                try:
                    content = response.json()["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    content = None
                if not isinstance(content, str):
                    raise JudgeError(
                        f"{url} answered 200 without choices[0].message.content: {response.text[:200]}"
                    )
                return content
            if response.status_code != 429 and response.status_code < 500:
                raise JudgeError(
                    f"{url} refused the request ({response.status_code}): {response.text[:300]}; check --judge-url "
                    "(it ends in /v1), --judge-model and the API key."
                )
            failure = f"HTTP {response.status_code}"
            retry_after = response.headers.get("retry-after", "")
            if retry_after.replace(".", "", 1).isdigit():
                wait = min(MAX_BACKOFF_S, float(retry_after))
        if attempt < options.max_retries:
            await asyncio.sleep(wait)
    raise JudgeError(
        f"{url} failed {options.max_retries + 1} times ({failure}); the answers so far are cached: run the same "
        "command again to resume, or raise --max-retries."
    )


async def judge_labels(
    items: Sequence[RankedItem],
    points: Sequence[str],
    options: JudgeOptions,
    cache: Path,
    *,
    progress: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[dict[str, Verdict]]:
    """Each item's capability labels from the judge (see the module docstring); lists get none.

    Args:
        transport: an httpx transport for the client (tests pass a fake judge's).

    Raises:
        JudgeError: the endpoint failed (the answers so far stay in ``cache``).
    """
    answers = AnswerCache(cache)
    prompts: dict[str, str] = {}  # key -> prompt
    plan: list[tuple[int, str, str, str]] = []  # (item, point, forward key, swapped key)
    for index, item in enumerate(items):
        texts = pair_texts(item)
        if texts is None:
            continue
        query, chosen, rejected = texts
        for point in points:
            keys = []
            for first, second in ((chosen, rejected), (rejected, chosen)):
                prompt = judge_prompt(point, query, first, second)
                key = AnswerCache.key(options.model, prompt)
                prompts[key] = prompt
                keys.append(key)
            plan.append((index, point, keys[0], keys[1]))
    todo = [key for key in prompts if key not in answers.answers]
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    limit = asyncio.Semaphore(options.concurrency)
    bar = tqdm(total=len(todo), desc="judge", unit="prompt", disable=not progress)

    async def one(client: httpx.AsyncClient, key: str) -> None:
        async with limit:
            answers.add(key, await ask(client, options, prompts[key]))
        bar.update(1)

    try:
        async with httpx.AsyncClient(
            headers=headers, timeout=options.timeout_s, transport=transport
        ) as client:
            tasks = [asyncio.create_task(one(client, key)) for key in todo]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        bar.close()
        answers.close()
    labels: list[dict[str, Verdict]] = [{} for _ in items]
    for index, point, forward, swapped in plan:
        found = verdict(answers.answers.get(forward), answers.answers.get(swapped))
        if found is not None:
            labels[index][point] = found
    return labels
