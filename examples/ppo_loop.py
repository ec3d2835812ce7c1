"""A small policy-optimisation loop that gets its rewards from rmserve through the client library.

The policy answers HH-RLHF prompts by choosing among candidate replies (each prompt's two human-rated
replies): a tabular softmax policy, one logit per (prompt, reply). Each step it samples ``--samples``
rollouts for each of ``--prompts`` prompts, asks the reward server for their rewards (the robust
``tradeoff`` aggregate of ``demo-brme`` by default, with every head's reward and sigma), and takes an
RLOO policy-gradient step (each rollout's baseline is the mean reward of the prompt's other rollouts).
It logs the mean reward, the head disagreement (std over heads), the mean sigma, and how often the
policy picks the reply the human labellers preferred.

Needs only the client (``pip install ./clients``: httpx and pydantic, no torch) and a server:

    rmserve serve                              # in one terminal (the demo models)
    python examples/ppo_loop.py --steps 10     # in another: about 2 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
import statistics
import time
from pathlib import Path

from rmserve_client import RewardClient

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
TURN = re.compile(r"\n\n(Human|Assistant): ")
ROLES = {"Human": "user", "Assistant": "assistant"}


def messages(dialogue: str) -> list[dict[str, str]]:
    """An HH dialogue as chat messages."""
    parts = TURN.split(dialogue)
    return [{"role": ROLES[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def load_prompts(path: Path, limit: int) -> list[tuple[list[dict[str, str]], list[str]]]:
    """(prompt turns, [preferred reply, other reply]) for the first ``limit`` usable pairs."""
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            chosen, rejected = messages(row["chosen"]), messages(row["rejected"])
            if len(chosen) < 2 or chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
                continue
            if chosen[-1]["content"] == rejected[-1]["content"]:
                continue
            out.append((chosen[:-1], [chosen[-1]["content"], rejected[-1]["content"]]))
            if len(out) == limit:
                break
    return out


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="demo-brme")
    parser.add_argument("--aggregate", default="tradeoff", help="the aggregate to optimise")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--pool", type=int, default=16, help="prompts the policy learns on")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--samples", type=int, default=4, help="rollouts per prompt (RLOO needs >= 2)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("--samples must be at least 2 (each rollout's baseline is the others' mean).")

    rng = random.Random(args.seed)
    pool = load_prompts(args.data, args.pool)
    logits = [[0.0, 0.0] for _ in pool]  # the policy: one logit per candidate reply
    with RewardClient(args.url, timeout=600) as client:
        print(f"{'step':>4} {'reward':>8} {'head std':>8} {'sigma':>7} {'preferred':>9} {'seconds':>7}")
        for step in range(1, args.steps + 1):
            started = time.perf_counter()
            batch = rng.sample(range(len(pool)), args.prompts)
            rollouts = []  # (prompt index, chosen candidate)
            for p in batch:
                probs = softmax(logits[p])
                rollouts += [(p, 0 if rng.random() < probs[0] else 1) for _ in range(args.samples)]
            conversations = [
                pool[p][0] + [{"role": "assistant", "content": pool[p][1][c]}] for p, c in rollouts
            ]
            result = client.score_messages(
                conversations, model=args.model, aggregates=[args.aggregate, "std"], return_heads=True
            )
            rewards = result.aggregates[args.aggregate]
            for start in range(0, len(rollouts), args.samples):  # RLOO step, prompt by prompt
                group = range(start, start + args.samples)
                total = sum(rewards[i] for i in group)
                for i in group:
                    p, c = rollouts[i]
                    advantage = rewards[i] - (total - rewards[i]) / (args.samples - 1)
                    probs = softmax(logits[p])
                    for k in range(2):  # d log pi(c) / d logit_k = 1[k = c] - pi(k)
                        logits[p][k] += args.lr * advantage * ((k == c) - probs[k]) / args.samples
            sigmas = [statistics.fmean(row) for row in result.head_std] if result.head_std else [float("nan")]
            preferred = sum(1 for _, c in rollouts if c == 0) / len(rollouts)
            print(
                f"{step:>4} {statistics.fmean(rewards):>8.4f} {statistics.fmean(result.aggregates['std']):>8.4f} "
                f"{statistics.fmean(sigmas):>7.4f} {preferred:>9.1%} {time.perf_counter() - started:>7.1f}",
                flush=True,
            )
    learned = statistics.fmean(softmax(row)[0] for row in logits)
    print(
        f"policy's probability of the labellers' preferred reply, averaged over {len(pool)} prompts: {learned:.3f}"
    )


if __name__ == "__main__":
    main()
