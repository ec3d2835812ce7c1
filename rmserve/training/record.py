"""The training record every training command writes into its output folder (``training.json``).

A record says what produced a model folder: the command, the data (pair counts and a SHA-256 of each
split's pairs, so two runs can be checked for the same data), the seeds and every hyper-parameter, the
results (held-out accuracy per epoch, with its standard error), the time taken and the versions of the
libraries that did the work.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rmserve.models.inputs import INPUT_ADAPTER
from rmserve.training.pairs import PreferenceExample

RECORD = "training.json"
_LIBRARIES = ("rmserve", "torch", "transformers", "peft")


def pairs_digest(pairs: Sequence[PreferenceExample]) -> str:
    """SHA-256 of the pairs' canonical JSON, in order: equal digests mean the same pairs."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(INPUT_ADAPTER.dump_json(pair.chosen))
        digest.update(b"\x00")
        digest.update(INPUT_ADAPTER.dump_json(pair.rejected))
        digest.update(b"\x01")
    return digest.hexdigest()


def data_record(
    train: Sequence[PreferenceExample], held_out: Sequence[PreferenceExample], source: str
) -> dict[str, Any]:
    """What the run trained and was measured on."""
    return {
        "source": source,
        "train_pairs": len(train),
        "train_sha256": pairs_digest(train),
        "held_out_pairs": len(held_out),
        "held_out_sha256": pairs_digest(held_out),
    }


def refuse_nonempty(out: Path) -> None:
    """Refuse to write a model into a folder that already holds files (stale ones would be served with it).

    Raises:
        ValueError: ``out`` exists and is not empty.
    """
    if out.exists() and any(out.iterdir()):
        raise ValueError(
            f"{out} exists and is not empty: choose a new --out folder or remove this one first."
        )


def versions() -> dict[str, str]:
    """The versions of Python and of the libraries that train."""
    found = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def plain(value: Any) -> Any:
    """``value`` as JSON types: dataclasses and mappings become objects, tuples lists, paths strings."""
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_record(
    out: Path,
    *,
    command: str,
    data: Mapping[str, Any],
    options: Any,
    results: Mapping[str, Any],
    started: float,
) -> dict[str, Any]:
    """Write ``out / training.json`` and return it.

    Args:
        out: the output folder (created if needed).
        command: the command that trained, e.g. ``rmserve train``.
        data: ``data_record``'s description of the data.
        options: the hyper-parameters and seeds (a dataclass or a mapping).
        results: held-out accuracies and whatever else the run measured.
        started: ``time.monotonic()`` when the run began.
    """
    record = {
        "command": command,
        "data": plain(data),
        "options": plain(options),
        "results": plain(results),
        "seconds": round(time.monotonic() - started, 1),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
