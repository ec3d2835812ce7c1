"""Baseline for the benchmarks: a server that scores each request alone, as OpenRLHF's serve_rm does.

Same tokenisation and model code as rmserve (so only the batching differs): each request's inputs are
encoded and forwarded together inside the request handler, one request at a time, blocking the event
loop as a synchronous handler does.

    python bench/naive_server.py serve --model demo --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import argparse
import sys

import uvicorn
from fastapi import FastAPI

from rmserve.api.schemas import ScoreRequest, ScoreResponse, Status, Usage
from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.models.base import reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.scoring.loading import resolve_model_path


def create_naive_app(model: DenseRewardModel, max_length: int) -> FastAPI:
    app = FastAPI()
    encoder = model.new_encoder(max_length)

    @app.get("/ready")
    async def ready() -> Status:
        return Status(status="ready")

    @app.post("/v1/score")
    async def score(body: ScoreRequest) -> ScoreResponse:
        encoded = encoder.encode_many(body.inputs, body.truncation or "left")
        rewards = reward_values(model, encoded)  # blocks the loop: one request at a time
        return ScoreResponse(
            model=model.info.name,
            reward=model.info.reward,
            rewards=rewards,
            truncated=[e.truncated for e in encoded],
            usage=Usage(input_tokens=sum(len(e) for e in encoded)),
        )

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    settings = Settings(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    path = resolve_model_path(ModelSpec(name="naive", path=args.model), settings.cache_dir)
    model = DenseRewardModel("naive", path, LoadOptions(dtype=args.dtype, device="cpu"))
    uvicorn.run(create_naive_app(model, args.max_length), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
