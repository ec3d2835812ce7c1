"""rmserve's own app over a backend that computes nothing: the requests per second one server process handles.

The backend (``NoopModel``) takes token ids as given (no tokenizer) and answers every batch with zero
rewards at once, so everything measured is rmserve's HTTP, validation, batching, metrics and logging
path: the ceiling a forward can only lower.

    python bench/noop_server.py --host 127.0.0.1 --port 8002
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
import uvicorn

from rmserve.api.app import create_app
from rmserve.cli_support import configure_logging
from rmserve.config import Settings
from rmserve.models.base import HeadOutputs, ModelInfo
from rmserve.models.inputs import EncodedInput, InputError, RewardInput, TokenIds
from rmserve.names import AGGREGATES


class NoopEncoder:
    """Token ids as given; any other input form is refused."""

    max_length = 1 << 20

    def encode_many(self, items: Sequence[RewardInput], truncation: str = "left", limit: int | None = None):
        out = []
        for item in items:
            if not isinstance(item, TokenIds):
                raise InputError("the no-op server takes token ids only: send {'input_ids': [...]}.")
            out.append(EncodedInput(tuple(item.input_ids), None, False))
        return out


class NoopModel:
    """A reward model whose forward is free: every reward is 0."""

    def __init__(self) -> None:
        self.info = ModelInfo(
            name="noop", kind="dense", architecture="none", dtype="float32", device="cpu",
            max_length=NoopEncoder.max_length, parameters=0, path="noop",
        )  # fmt: skip

    def new_encoder(self, max_length: int | None = None) -> NoopEncoder:
        return NoopEncoder()

    def score(self, batch, *, uwo_lambda, tradeoff_lambda, plan=None) -> HeadOutputs:
        rows = len(batch)
        return HeadOutputs(torch.zeros(rows, 1), None, torch.zeros(rows, len(AGGREGATES)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as rmserve serve sets it
    configure_logging("info", "text")  # as rmserve serve's defaults: every request access-logged
    settings = Settings(max_length=1 << 20, max_batch_tokens=1 << 20, duplicate_cache_entries=0)
    uvicorn.run(
        create_app(settings, models=[NoopModel()]),
        host=args.host,
        port=args.port,
        log_level="info",
        log_config=None,
        access_log=False,  # rmserve.access logs every request, as under rmserve serve
    )


if __name__ == "__main__":
    sys.exit(main())
