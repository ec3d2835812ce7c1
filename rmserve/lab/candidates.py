"""The candidates file: n sampled responses per prompt, as ``rmserve lab generate`` writes them.

One JSON object a line, one line a prompt::

    {"id": str, "prompt": str, "responses": [str, ...],
     "response_tokens": [int, ...], "finished": [bool, ...]}

``response_tokens`` counts each response's generated tokens (its end-of-turn token included) and
``finished`` says whether the policy ended the turn itself (else it was cut at ``max_new_tokens``);
both are optional for files made elsewhere. A candidates path is either such a file (``.jsonl`` or
``.jsonl.gz``) or a folder of ``chunk-NNNNN.jsonl.gz`` files (what ``generate`` writes), read in name order.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CHUNK_GLOB = "chunk-*.jsonl.gz"


@dataclass(frozen=True)
class Candidates:
    """The sampled responses to one prompt."""

    id: str
    prompt: str
    responses: list[str]
    response_tokens: list[int] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The JSON object of this record."""
        record: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "responses": self.responses}
        if self.response_tokens:
            record["response_tokens"] = self.response_tokens
        if self.finished:
            record["finished"] = self.finished
        return record


def chunk_name(index: int) -> str:
    """The file name of chunk ``index``."""
    return f"chunk-{index:05d}.jsonl.gz"


def write_chunk(path: Path, records: Sequence[Candidates]) -> None:
    """Write ``records`` to ``path`` atomically (a partial chunk never has the final name)."""
    partial = path.with_name(path.name + ".partial")
    with gzip.open(partial, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.as_json(), ensure_ascii=False) + "\n")
    os.replace(partial, path)


def _parse(record: Any, where: str) -> Candidates:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    cid, prompt, responses = record.get("id"), record.get("prompt"), record.get("responses")
    if not isinstance(cid, str) or not isinstance(prompt, str):
        raise ValueError(f'{where}: "id" and "prompt" must be strings')
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise ValueError(f'{where}: "responses" must be a non-empty list of strings')
    tokens = record.get("response_tokens", [])
    finished = record.get("finished", [])
    for name, values, kind in (("response_tokens", tokens, int), ("finished", finished, bool)):
        if values and (len(values) != len(responses) or not all(isinstance(v, kind) for v in values)):
            raise ValueError(f'{where}: "{name}" must hold one {kind.__name__} per response')
    return Candidates(cid, prompt, responses, tokens, finished)


def _open(path: Path) -> IO[str]:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def candidate_files(path: Path) -> list[Path]:
    """The files of a candidates path: the file itself, or a folder's chunks in name order.

    Raises:
        FileNotFoundError: nothing is there, or the folder has no chunk.
    """
    if path.is_dir():
        files = sorted(path.glob(CHUNK_GLOB))
        if not files:
            raise FileNotFoundError(
                f"{path} holds no {CHUNK_GLOB} file; run `rmserve lab generate --out {path}`."
            )
        return files
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; pass a candidates file or the folder `rmserve lab generate` wrote."
        )
    return [path]


def iter_candidates(path: Path) -> Iterator[Candidates]:
    """Every record of a candidates path, in order, one at a time (bounded memory).

    Raises:
        FileNotFoundError: see ``candidate_files``.
        ValueError: a malformed line (the message names the file and line), or an id that repeats.
    """
    ids: set[str] = set()
    for file in candidate_files(path):
        with _open(file) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where} is not JSON: {exc}") from None
                parsed = _parse(record, where)
                if parsed.id in ids:
                    raise ValueError(f"{where}: prompt id {parsed.id!r} repeats; each prompt appears once.")
                ids.add(parsed.id)
                yield parsed


def read_candidates(path: Path) -> list[Candidates]:
    """Every record of a candidates path (see ``iter_candidates``)."""
    return list(iter_candidates(path))
