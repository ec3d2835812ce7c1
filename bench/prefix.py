"""Prefix sharing on GRPO-shaped load: tokens scored per second with and without sharing, in one run.

GRPO, RLOO and best-of-n score G responses to each prompt. The load here: HH-RLHF prompts of 200 to 600
tokens (the dialogue up to its last assistant turn, chat-templated), each with G responses of 32 to 128
tokens (assistant turns of other HH dialogues, cut to a random length), sent to the demo model

- as one request per group (G inputs in one request), ``--clients`` groups in flight;
- as one request per response (G concurrent single-input requests per group), ``--clients`` groups in
  flight, so the batcher must find the group among separate requests.

Two servers run side by side, one with ``--prefix-min-tokens`` at its default and one with 0 (off); their
runs are interleaved and each figure is the median of ``--repeats`` runs. Tokens are the inputs' full
token counts (prompt and response), the same for both servers.

Offline, the same groups are scored by the model directly, each group with and without a prefix plan
(the forward alone, no server; ``--offline`` runs only the offline tables, as ``bench/gpu.sh`` does on a
GPU). A last table sizes the minimum prefix worth sharing: one group of G = 8 responses of 64 tokens to
prompts of P tokens, with and without a plan.

    python bench/prefix.py --out docs/benchmarks.md
    python bench/prefix.py --offline --device cuda --dtype bfloat16 --out docs/benchmarks-gpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from report import machine, write_section  # bench/report.py: run as python bench/prefix.py

from rmserve.batching.planning import BatchLimits, plan_offline
from rmserve.batching.prefix import PrefixPlan, plan_prefixes
from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.launch import start_server
from rmserve.models.base import lambdas_for
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import INPUT_ADAPTER, EncodedInput, Messages
from rmserve.names import PREFIX_MIN_TOKENS
from rmserve.scoring.loading import resolve_model_path
from rmserve.scoring.registry import resolve_limits
from rmserve.training.hh import default_data_path, load_pairs

ROOT = Path(__file__).resolve().parents[1]
NO_CACHE = ("--duplicate-cache-entries", "0")


def groups_of(encoder, tokenizer, pairs, *, groups: int, size: int, seed: int) -> list[list[dict]]:
    """``groups`` prompts of 200-600 tokens, each with ``size`` responses of 32-128 tokens, as API inputs."""
    rng = random.Random(seed)
    replies = [
        m["content"] for p in pairs for m in p.chosen if m["role"] == "assistant" and m["content"].strip()
    ]
    out: list[list[dict]] = []
    for pair in pairs:
        prompt = pair.chosen[:-1]
        if not 200 <= len(encoder.encode(Messages(messages=prompt)).token_ids) <= 600:
            continue
        group = []
        while len(group) < size:
            ids = tokenizer(rng.choice(replies), add_special_tokens=False)["input_ids"]
            if len(ids) < 32:
                continue
            text = tokenizer.decode(ids[: rng.randint(32, 128)])
            group.append({"messages": [*prompt, {"role": "assistant", "content": text}]})
        out.append(group)
        if len(out) == groups:
            return out
    raise SystemExit(f"only {len(out)} HH prompts have 200-600 tokens; ask for fewer --groups.")


async def drive(url: str, groups: list[list[dict]], clients: int, per_response: bool) -> tuple[float, int]:
    """Score every group with ``clients`` groups in flight; return (seconds, input tokens)."""
    queue = iter(groups)
    tokens = 0

    async def post(client: httpx.AsyncClient, inputs: list[dict]) -> None:
        nonlocal tokens
        r = await client.post("/v1/score", json={"inputs": inputs})
        r.raise_for_status()
        tokens += r.json()["usage"]["input_tokens"]

    async def client_loop(client: httpx.AsyncClient) -> None:
        for group in queue:
            if per_response:
                await asyncio.gather(*(post(client, [x]) for x in group))
            else:
                await post(client, group)

    width = clients * max(len(g) for g in groups)
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return time.perf_counter() - start, tokens


def reused(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(x.split()[-1]) for x in text.splitlines() if x.startswith("rmserve_prefix_tokens_reused_total{")
    )


def sync(model: DenseRewardModel) -> None:
    """Wait for the GPU, so the clock measures its work."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def timed_groups(
    model: DenseRewardModel,
    encoded: list[list[EncodedInput]],
    plans: list[PrefixPlan],
    cuts: list[list[list[int]]],
    *,
    shared: bool,
) -> float:
    """Seconds to score every group: in one call with its prefix plan, or cut into batches without one."""
    start = time.perf_counter()
    for group, plan, batches in zip(encoded, plans, cuts, strict=True):
        if shared:
            model.score(group, **lambdas_for(model.info.defaults, len(group)), plan=plan)
            continue
        for batch in batches:
            rows = [group[i] for i in batch]
            model.score(rows, **lambdas_for(model.info.defaults, len(rows)))
    sync(model)
    return time.perf_counter() - start


def offline_table(
    model: DenseRewardModel, encoder, loads: dict[int, list[list[dict]]], limits: BatchLimits, repeats: int
) -> dict[int, tuple[float, float]]:
    """Per G: (tokens/s without a plan, with one), each group scored alone, runs interleaved."""
    out = {}
    for size, groups in loads.items():
        encoded = [[encoder.encode(INPUT_ADAPTER.validate_python(x)) for x in g] for g in groups]
        tokens = sum(len(x) for g in encoded for x in g)
        plans = [plan_prefixes([x.token_ids for x in g], PREFIX_MIN_TOKENS, limits) for g in encoded]
        cuts = [plan_offline([len(x) for x in g], limits) for g in encoded]

        work = (model, encoded, plans, cuts)
        timed_groups(*work, shared=False)  # warm-up
        timed_groups(*work, shared=True)
        times: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(repeats):
            for shared in (False, True) if repeat % 2 == 0 else (True, False):
                times[shared].append(timed_groups(*work, shared=shared))
        out[size] = (tokens / statistics.median(times[False]), tokens / statistics.median(times[True]))
    return out


def min_prefix_table(
    model: DenseRewardModel, limits: BatchLimits, repeats: int
) -> list[tuple[int, float, float]]:
    """(P, seconds without a plan, seconds with one) for one group of 8 responses of 64 tokens."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for prefix in (8, 16, 32, 64, 128, 256):
        shared = torch.randint(100, 40000, (prefix,), generator=g).tolist()
        batch = [
            EncodedInput(tuple(shared + torch.randint(100, 40000, (64,), generator=g).tolist()), None, False)
            for _ in range(8)
        ]
        plan = plan_prefixes([x.token_ids for x in batch], 1, limits)
        lambdas = lambdas_for(model.info.defaults, len(batch))
        times: dict[bool, list[float]] = {False: [], True: []}
        model.score(batch, **lambdas)  # warm-up
        for repeat in range(repeats):
            for use in (False, True) if repeat % 2 == 0 else (True, False):
                start = time.perf_counter()
                model.score(batch, **lambdas, plan=plan if use else None)
                sync(model)
                times[use].append(time.perf_counter() - start)
        rows.append((prefix, statistics.median(times[False]), statistics.median(times[True])))
    return rows


def served_table(
    demo_path: Path, loads: dict[int, list[list[dict]]], clients: int, repeats: int
) -> tuple[dict[tuple[int, str, str], list[float]], dict[tuple[int, str], float]]:
    """Tokens/s per (G, shape, server) over interleaved runs, and the share of tokens the sharing server reused."""
    results: dict[tuple[int, str, str], list[float]] = {}
    reuse: dict[tuple[int, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for name, flag in (("shared", PREFIX_MIN_TOKENS), ("off", 0)):
                servers[name] = start_server(
                    # runs repeat the inputs: the duplicate cache is off, so the forwards are measured
                    [
                        "--model",
                        str(demo_path),
                        "--dtype",
                        "float32",
                        "--prefix-min-tokens",
                        str(flag),
                        *NO_CACHE,
                    ],
                    Path(tmp) / f"{name}.log",
                )
            for size, groups in loads.items():
                for shape in ("group", "response"):
                    for server in servers.values():  # warm-up
                        asyncio.run(drive(server.url, groups[:1], 1, shape == "response"))
                    for repeat in range(repeats):
                        for name in list(servers) if repeat % 2 == 0 else list(servers)[::-1]:
                            url = servers[name].url
                            before = reused(url)
                            print(
                                f"G={size} {shape} {name} run {repeat + 1} ...", file=sys.stderr, flush=True
                            )
                            seconds, tokens = asyncio.run(drive(url, groups, clients, shape == "response"))
                            results.setdefault((size, shape, name), []).append(tokens / seconds)
                            if name == "shared":
                                reuse[(size, shape)] = (reused(url) - before) / tokens
        finally:
            for server in servers.values():
                server.stop()
    return results, reuse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16], help="responses per prompt (G)")
    parser.add_argument("--groups", type=int, default=4, help="prompts per run")
    parser.add_argument("--clients", type=int, default=2, help="groups in flight (served runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--offline", action="store_true", help="only the offline tables (no servers)")
    parser.add_argument("--device", default="cpu", help="for the offline tables (the servers run on CPU)")
    parser.add_argument("--dtype", default="float32", help="for the offline tables")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    settings = Settings()
    demo_path = resolve_model_path(ModelSpec(name="demo", path="demo"), settings.cache_dir)
    model = DenseRewardModel("demo", demo_path, LoadOptions(dtype=args.dtype, device=args.device))
    limits, max_length, _ = resolve_limits(settings, None, model.info)
    encoder = model.new_encoder(max_length)
    pairs = load_pairs(default_data_path(ROOT))
    loads = {
        g: groups_of(encoder, encoder.tokenizer, pairs, groups=args.groups, size=g, seed=g)
        for g in args.sizes
    }
    served = None if args.offline else served_table(demo_path, loads, args.clients, args.repeats)
    print("offline ...", file=sys.stderr, flush=True)
    offline = offline_table(model, encoder, loads, limits, args.repeats)
    table = min_prefix_table(model, limits, args.repeats)
    report = render(args, model, loads, served, offline, table)
    write_section(args.out, "bench/prefix.py", report)
    print(report)


def shown(path: Path) -> str:
    """A path as the command in the report gives it: relative to the repository when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def render(args, model, loads, served, offline, table) -> str:
    command = "python bench/prefix.py " + (
        f"--offline --device {args.device} --dtype {args.dtype} " if args.offline else ""
    )
    lines = [
        "## Prefix sharing on GRPO-shaped load (`bench/prefix.py`)",
        "",
        f"Command: `{command}--out {shown(args.out)}` "
        f"({machine()}). The demo model; {args.groups} HH prompts of 200-600 tokens, each with G responses "
        f"of 32-128 tokens; median of {args.repeats} interleaved runs. Tokens are the inputs' full token "
        f"counts (prompt and response), the same with and without sharing; minimum prefix {PREFIX_MIN_TOKENS} "
        "(the default).",
        "",
    ]
    if served is not None:
        results, reuse = served
        lines += [
            f"**Served** (float32, CPU): two servers side by side, `--prefix-min-tokens {PREFIX_MIN_TOKENS}` and "
            f"`0` (off), {args.clients} groups in flight.",
            "",
            "| G | sent as | tokens/s, sharing off | tokens/s, sharing on | speed-up | tokens not recomputed |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for size in loads:
            for shape, words in (
                ("group", "one request per group"),
                ("response", "one request per response"),
            ):
                off = statistics.median(results[(size, shape, "off")])
                on = statistics.median(results[(size, shape, "shared")])
                lines.append(
                    f"| {size} | {words} | {off:.0f} | {on:.0f} | {on / off:.2f}x | {reuse[(size, shape)]:.0%} |"
                )
        lines += [
            "",
            "The last column is the sharing server's `rmserve_prefix_tokens_reused_total` over the run's "
            "tokens (its last run).",
            "",
        ]
    lines += [
        f"**Offline** ({model.info.dtype} on {model.info.device}): each group scored by the model directly, "
        "cut into batches by the server's limits without a plan, or in one call with its prefix plan.",
        "",
        "| G | tokens/s, no plan | tokens/s, prefix plan | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {size} | {off:.0f} | {on:.0f} | {on / off:.2f}x |" for size, (off, on) in offline.items()]
    lines += [
        "",
        "**The shortest prefix worth sharing**: one group of 8 responses of 64 tokens (random ids) with a "
        "shared prefix of P tokens, scored in one batch, with and without a plan.",
        "",
        "| P | one forward (s) | prefix once (s) | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {p} | {full:.4f} | {shared:.4f} | {full / shared:.2f}x |" for p, full, shared in table]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
