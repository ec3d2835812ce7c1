"""rmserve side by side with its peers, in one interleaved run: ratios, not absolute figures.

Contenders, each scoring the same inputs:

- ``rmserve``: ``rmserve serve`` with its defaults (float32 on CPU);
- ``rmserve, padded`` (small regime): the same with packing off (``--max-packed-tokens 0``), every batch
  right-padded;
- ``rmserve --compile``: the defaults plus compiled forwards (``rmserve.models.compile``);
- ``rmserve --cpu-row-threads 2``: the defaults with each batch split into two parts run side by side,
  one core each (``rmserve.models.parallel``), and ``rmserve --cpu-row-threads 2 --compile``, both;
- ``naive``: ``bench/naive_server.py``, the same tokenisation and model code scoring each request alone in
  its handler, as OpenRLHF's ``serve_rm`` does;
- ``offline, one at a time``: the model's forward on each input alone, in this process, tokenised up
  front (no HTTP, no batching: what a trainer scoring in-process one rollout at a time gets);
- ``offline, one at a time, compiled``: the same through the model's compiled forward (what a trainer
  that compiles its reward model gets);
- ``offline, batched``: the same inputs sorted by length and cut into the server's batches (``rmserve
  score``);
- ``infinity`` (with ``--infinity-url``): an infinity server (``infinity_emb``) already serving the same
  model folder, sent the chat-templated texts on its ``/classify`` route. It is not installed with
  rmserve; docs/benchmarks.md says how to run it in its own environment.

Regimes: ``realistic``, the demo model on HH dialogues; ``small``, a 4-layer, 512-wide model (random
weights, the demo's tokenizer) on rollouts of at most 32 tokens, where a forward costs little and the
per-request cost shows. Each request carries one input, from ``--concurrency`` clients. The contenders'
runs rotate order each repeat; each figure is the median. The requests per second one rmserve process
answers without a forward are ``bench/noop_server.py --measure``'s (a load generator in Python would be
the bottleneck there).

    python bench/peers.py --out docs/benchmarks.md
    python bench/peers.py --regime small --repeats 5 --out docs/benchmarks.md
    python bench/peers.py --regime realistic --requests 64 --contender 'offline, one at a time'
    python bench/peers.py --regime realistic --infinity-url http://127.0.0.1:7997 --out docs/benchmarks.md

Each regime writes its own section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loadgen import drive  # bench/loadgen.py: run as python bench/peers.py
from report import machine, write_section

from rmserve.batching.planning import plan_offline
from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.launch import start_server
from rmserve.models.base import reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import EncodedInput, Messages, TokenIds
from rmserve.scoring.loading import resolve_model_path, warm_up
from rmserve.scoring.registry import resolve_limits
from rmserve.training.hh import default_data_path, load_pairs

ROOT = Path(__file__).resolve().parents[1]
PADDED = "rmserve, padded (--max-packed-tokens 0)"
COMPILED = "rmserve --compile"
SPLIT = "rmserve --cpu-row-threads 2"
FASTEST = "rmserve --cpu-row-threads 2 --compile"
ALONE_COMPILED = "offline, one at a time, compiled"


@dataclass
class Regime:
    name: str
    description: str
    path: Path
    payloads: list[dict]  # one input each, as rmserve and naive take it
    texts: list[str]  # the same inputs as text, for infinity
    encoded: list[EncodedInput]
    tokens_per_s: dict[str, list[float]] = field(default_factory=dict)


def small_model(cache_dir: Path, demo_path: Path) -> Path:
    """A 4-layer, 512-wide Llama (random weights, seed 0) with the demo's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    target = cache_dir / "bench-small-4x512"
    if (target / "config.json").is_file():
        return target
    config = AutoConfig.from_pretrained(demo_path)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 4, 512, 1408
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 2, 64
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(demo_path).save_pretrained(target)
    return target


def rollout_ids(demo_path: Path, count: int) -> list[list[int]]:
    """``count`` short rollouts as token ids: the last 8 to 32 tokens of HH dialogues (chat-templated)."""
    encoder = DenseRewardModel("demo", demo_path, LoadOptions(dtype="float32", device="cpu")).new_encoder()
    pairs = load_pairs(default_data_path(ROOT))
    return [
        list(encoder.encode(Messages(messages=p.rejected)).token_ids[-(8 + i % 25) :])
        for i, p in enumerate(pairs[:count])
    ]


def offline(model: DenseRewardModel, encoded: list[EncodedInput], batches: list[list[int]]) -> float:
    """Seconds to score every input, in ``batches``."""
    start = time.perf_counter()
    for batch in batches:
        reward_values(model, [encoded[i] for i in batch])
    return time.perf_counter() - start


def regimes_of(settings: Settings, demo_path: Path, small_path: Path, requests: int) -> list[Regime]:
    demo = DenseRewardModel("demo", demo_path, LoadOptions(dtype="float32", device="cpu"))
    encoder = demo.new_encoder()
    tokenizer = encoder.tokenizer
    pairs = load_pairs(default_data_path(ROOT))
    dialogues = [p.chosen for p in pairs[:requests]]
    short = rollout_ids(demo_path, 4 * requests)
    return [
        Regime(
            "realistic",
            f"the demo model (SmolLM2-135M reward model) on {len(dialogues)} HH-RLHF dialogues (chat-templated)",
            demo_path,
            [{"inputs": [{"messages": d}]} for d in dialogues],
            [tokenizer.apply_chat_template(d, tokenize=False) for d in dialogues],
            [encoder.encode(Messages(messages=d)) for d in dialogues],
        ),
        Regime(
            "small",
            f"a 4-layer, 512-wide model on {len(short)} rollouts of 8 to 32 tokens (token ids): a forward costs "
            "little, so the per-request cost shows",
            small_path,
            [{"inputs": [{"input_ids": ids}]} for ids in short],
            [tokenizer.decode(ids) for ids in short],
            [encoder.encode(TokenIds(input_ids=ids)) for ids in short],
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=128, help="dialogues (realistic); 4x as many rollouts (small)"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--infinity-url", default=None, help="an infinity server already serving the model")
    parser.add_argument(
        "--infinity-model", default=None, help="the model id infinity serves (default: its path)"
    )
    parser.add_argument(
        "--regime", action="append", choices=("realistic", "small"), help="run only these (default: both)"
    )
    parser.add_argument(
        "--contender",
        action="append",
        help="run only these contenders, named as in the table (repeatable); rmserve and rmserve --compile "
        "always run, as the ratios are against them",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    def wanted(name: str) -> bool:
        return not args.contender or name in args.contender or name in ("rmserve", COMPILED)

    settings = Settings()
    demo_path = resolve_model_path(ModelSpec(name="demo", path="demo"), settings.cache_dir)
    small_path = small_model(settings.cache_dir, demo_path)
    regimes = [
        r
        for r in regimes_of(settings, demo_path, small_path, args.requests)
        if r.name in (args.regime or (r.name,))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for regime in regimes:
            model = DenseRewardModel(
                regime.path.name, regime.path, LoadOptions(dtype="float32", device="cpu")
            )
            compiled = model
            if wanted(ALONE_COMPILED):
                compiled = DenseRewardModel(
                    regime.path.name, regime.path, LoadOptions(dtype="float32", device="cpu", compile=True)
                )
                warm_up(compiled)  # compiles its graphs before any run is timed
            limits, _, _ = resolve_limits(settings, None, model.info)
            alone = [[i] for i in range(len(regime.encoded))]
            batched = plan_offline([len(e) for e in regime.encoded], limits)
            tokens = sum(len(e) for e in regime.encoded)
            servers = {}
            try:
                servers["rmserve"] = start_server(
                    ["--model", str(regime.path), "--dtype", "float32", "--duplicate-cache-entries", "0"],
                    Path(tmp) / "r.log",
                )
                if wanted("naive"):
                    servers["naive"] = start_server(
                        ["--model", str(regime.path)], Path(tmp) / "n.log",
                        command=[sys.executable, str(ROOT / "bench" / "naive_server.py"), "serve"],
                    )  # fmt: skip
                for name, flags in (
                    (COMPILED, ["--compile"]),
                    (SPLIT, ["--cpu-row-threads", "2"]),
                    (FASTEST, ["--cpu-row-threads", "2", "--compile"]),
                ):
                    if not wanted(name):
                        continue
                    servers[name] = start_server(
                        ["--model", str(regime.path), "--dtype", "float32", "--duplicate-cache-entries", "0",
                         *flags],
                        Path(tmp) / f"{len(servers)}.log", ready_timeout=1200,
                    )  # fmt: skip
                if regime.name == "small" and wanted(PADDED):  # short ragged rollouts: what packing is for
                    servers[PADDED] = start_server(
                        ["--model", str(regime.path), "--dtype", "float32", "--duplicate-cache-entries", "0",
                         "--max-packed-tokens", "0"],
                        Path(tmp) / "p.log",
                    )  # fmt: skip
                runs: dict[str, object] = {name: None for name in servers}
                offline = {
                    "offline, one at a time": alone,
                    ALONE_COMPILED: alone,
                    "offline, batched": batched,
                }
                runs |= {name: batches for name, batches in offline.items() if wanted(name)}
                if args.infinity_url and regime.name == "realistic":
                    runs["infinity"] = None
                names = list(runs)
                for name in names:  # warm-up
                    once(
                        name,
                        servers,
                        regime,
                        compiled if name == ALONE_COMPILED else model,
                        runs,
                        args,
                        warm=True,
                    )
                for repeat in range(args.repeats):
                    shift = repeat % len(names)
                    for name in names[shift:] + names[:shift]:
                        print(f"{regime.name}: {name} run {repeat + 1} ...", file=sys.stderr, flush=True)
                        offline_model = compiled if name == ALONE_COMPILED else model
                        seconds = once(name, servers, regime, offline_model, runs, args, warm=False)
                        regime.tokens_per_s.setdefault(name, []).append(tokens / seconds)
            finally:
                for server in servers.values():
                    server.stop()
            report = render(args, regime)
            write_section(args.out, f"bench/peers.py --regime {regime.name}", report)
            print(report)


def once(name, servers, regime: Regime, model, runs, args, *, warm: bool) -> float:
    """One run of one contender over the regime's inputs (a few inputs when ``warm``); its seconds."""
    count = args.concurrency if warm else len(regime.payloads)
    if name in servers:
        return asyncio.run(drive(servers[name].url, "/v1/score", regime.payloads[:count], args.concurrency))
    if name == "infinity":
        model_id = args.infinity_model or str(regime.path)
        bodies = [{"model": model_id, "input": [t], "raw_scores": True} for t in regime.texts[:count]]
        return asyncio.run(drive(args.infinity_url, "/classify", bodies, args.concurrency))
    batches = runs[name]
    if warm:
        batches = batches[:2]
    return offline(model, regime.encoded, batches)


def render(args, regime: Regime) -> str:
    ours = statistics.median(regime.tokens_per_s["rmserve"])
    compiled = statistics.median(regime.tokens_per_s[COMPILED])
    lines = [
        f"## rmserve and its peers, interleaved: {regime.name} (`bench/peers.py --regime {regime.name}`)",
        "",
        f"Machine: {machine()}. No GPU.",
        "",
        "```",
        f"python bench/peers.py --regime {regime.name} --requests {args.requests} --concurrency {args.concurrency} "
        f"--repeats {args.repeats}"
        + "".join(f" --contender '{c}'" for c in args.contender or ())
        + (" --infinity-url URL" if "infinity" in regime.tokens_per_s else ""),
        "```",
        "",
        f"{regime.description[0].upper()}{regime.description[1:]}. One input per request from {args.concurrency} "
        f"concurrent clients; the contenders' runs interleaved (rotating order), median of {args.repeats}. Server "
        "defaults, float32; `--compile` adds compiled forwards (compiled at load, before the runs), "
        "`--cpu-row-threads 2` splits each batch into two parts run side by side, one core each. The offline contenders run in the benchmark's process with torch's default threading. The load "
        "generator (`bench/loadgen.py`: prepared requests on keep-alive connections, tens of microseconds each) "
        "runs on the same 2 cores.",
        "",
        f"| contender | tokens/s | rmserve is | {COMPILED} is |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, runs in regime.tokens_per_s.items():
        tps = statistics.median(runs)
        ratio = "" if name == "rmserve" else f"{ours / tps:.2f}x"
        ratio_compiled = "" if name == COMPILED else f"{compiled / tps:.2f}x"
        lines.append(f"| {name} | {tps:.0f} | {ratio} | {ratio_compiled} |")
    if regime.name == "realistic" and "infinity" not in regime.tokens_per_s:
        lines += [
            "",
            "infinity: not run. In its own environment (it is not a dependency of rmserve): "
            "`python -m venv /tmp/infinity && /tmp/infinity/bin/pip install torch==2.13.0 'infinity-emb[server]'`, "
            "then `/tmp/infinity/bin/infinity_emb v2 --model-id <the demo folder> --engine torch --device cpu "
            "--port 7997` and `python bench/peers.py --regime realistic --infinity-url http://127.0.0.1:7997`.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
