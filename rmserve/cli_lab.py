"""``rmserve lab ...``: the over-optimisation lab's commands (prompts, generate, train-proxies, bon).

The lab's modules load torch, transformers, httpx or matplotlib: each command imports what it runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from rmserve.cli_support import configure_logging as _configure_logging
from rmserve.cli_support import fail as _fail

lab = typer.Typer(
    help="The over-optimisation lab: sample candidates from a policy, train proxy reward models on gold "
    "labels, and measure best-of-n against a gold reward model (docs/overoptimization.md)."
)


def _echo(message: str) -> None:
    typer.echo(message, err=True)


def _need_client() -> None:
    """Exit with how to install the client when it is missing (the lab scores through it)."""
    if importlib.util.find_spec("rmserve_client") is None:
        raise _fail(
            ImportError("rmserve lab scores through rmserve-client: pip install ./clients (in the checkout).")
        )


@lab.command("prompts")
def prompts(
    data: Annotated[
        Path, typer.Option(help="Preference pairs (JSONL or .jsonl.gz; HH-RLHF dialogues or TRL shapes).")
    ],
    out: Annotated[Path, typer.Option(help="The folder to write eval.jsonl and train.jsonl into.")],
    eval_prompts: Annotated[
        int, typer.Option(help="Evaluation prompts (best-of-n is measured on these).")
    ] = 200,
    train_prompts: Annotated[
        int, typer.Option(help="Proxy-training prompts (disjoint from the eval prompts).")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
) -> None:
    """Split the distinct first user turns of a preference file into eval and proxy-training prompts."""
    from rmserve.lab.prompts import EVAL_FILE, TRAIN_FILE, distinct_prompts, split_prompts, write_prompts

    try:
        found = distinct_prompts(data)
        evals, trains = split_prompts(found, eval_prompts, train_prompts, seed)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    write_prompts(out / EVAL_FILE, evals)
    write_prompts(out / TRAIN_FILE, trains)
    _echo(
        f"{len(found)} distinct prompts; wrote {len(evals)} to {out / EVAL_FILE}, {len(trains)} to {out / TRAIN_FILE}"
    )


@lab.command("generate")
def generate(
    prompts_file: Annotated[Path, typer.Option("--prompts", help="A prompt file (rmserve lab prompts).")],
    out: Annotated[Path, typer.Option(help="The candidates folder (resumed when it holds the same run).")],
    policy: Annotated[
        str, typer.Option(help="'demo' (SmolLM2-135M-Instruct) or a causal LM folder.")
    ] = "demo",
    n: Annotated[int, typer.Option(help="Responses per prompt.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="The most tokens a response gets.")] = 48,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature (whole vocabulary, no top-k/top-p).")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed; chunk c draws from seed * 1000003 + c.")] = 0,
    batch_rows: Annotated[int, typer.Option(help="Sequences a batch decodes at once.")] = 256,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 (about 1.4x faster on CPU).")] = "float32",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Sample n responses per prompt from a causal LM, in resumable chunks."""
    from rmserve.lab.generate import SamplingOptions
    from rmserve.lab.generate import generate as run_generate

    _configure_logging("warning")
    if dtype not in ("float32", "bfloat16"):
        raise _fail(ValueError(f"--dtype must be float32 or bfloat16 (never float16 on CPU), got {dtype!r}."))
    try:
        options = SamplingOptions(
            n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_rows=batch_rows
        )
        run_generate(policy, prompts_file, out, options, dtype=dtype, progress=progress, echo=_echo)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None


@lab.command("train-proxies")
def train_proxies(
    candidates: Annotated[
        Path, typer.Option(help="Proxy-training candidates (rmserve lab generate --n 2 or more).")
    ],
    gold: Annotated[
        str, typer.Option(help="The gold reward that labels the pairs: URL[:MODEL[:AGGREGATE]].")
    ],
    base: Annotated[Path, typer.Option(help="The dense reward-model folder every proxy starts from.")],
    out: Annotated[
        Path, typer.Option(help="The folder of the proxies (resumed: finished proxies are kept).")
    ],
    pairs: Annotated[int, typer.Option(help="Training pairs.")] = 2000,
    held_out: Annotated[
        int, typer.Option(help="Pairs kept aside, with true labels, for held-out accuracy.")
    ] = 200,
    noise: Annotated[
        float, typer.Option(help="Chance that a training label is flipped (Coste et al.: 0.25).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the pairing shuffle and of the label noise.")] = 0,
    only: Annotated[
        str,
        typer.Option(help="Comma-separated proxies: dense, dense-bsr, ensemble, brme, moe, merged, dmoerm."),
    ] = "dense,dense-bsr,ensemble,brme,moe,merged,dmoerm",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Label pairs of policy samples with the gold, add label noise, and train the proxy reward models."""
    _need_client()
    from rmserve.lab.proxies import train_proxies as run_train_proxies
    from rmserve.lab.scoring import LabError
    from rmserve.lab.targets import parse_target

    _configure_logging("warning")
    try:
        if pairs < 1 or held_out < 1:
            raise ValueError("--pairs and --held-out must be at least 1.")
        names = [name.strip() for name in only.split(",") if name.strip()]
        record = run_train_proxies(
            candidates, parse_target(gold, "gold"), base, out, pairs=pairs, held_out=held_out, noise=noise,
            seed=seed, only=names, progress=progress, echo=_echo,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, LabError) as exc:
        raise _fail(exc) from None
    _echo(f"wrote {len(record['results'])} proxies to {out}")


@lab.command("bon")
def bon(
    out: Annotated[
        Path, typer.Option(help="The report folder (scores/ inside it makes a second run resume).")
    ],
    candidates: Annotated[
        Path | None,
        typer.Option(help="Candidates: a JSONL(.gz) file or the folder rmserve lab generate wrote."),
    ] = None,
    gold: Annotated[
        str | None, typer.Option(help="The gold reward: URL[:MODEL[:AGGREGATE]][?OPTIONS].")
    ] = None,
    proxy: Annotated[
        list[str] | None,
        typer.Option(
            help="A proxy reward (repeat the flag): [LABEL=]URL[:MODEL[:AGGREGATE]][?OPTION=VALUE&...]."
        ),
    ] = None,
    from_scores: Annotated[
        Path | None, typer.Option(help="Recompute the report from a raw-scores.jsonl.gz alone (no server).")
    ] = None,
    reuse: Annotated[
        Path | None,
        typer.Option(
            help="A previous report folder over the same candidates: its scores of targets with the same "
            "label, model, aggregate and options are copied, not asked of their servers."
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight per server (one prompt each).")] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take.")] = 600.0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the prompts.")] = 1000,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Best-of-n against a gold reward model: table, plot and raw scores of every proxy."""
    _need_client()
    from rmserve.lab.evaluate import read_raw, report, run_bon
    from rmserve.lab.scoring import LabError
    from rmserve.lab.targets import parse_target

    if concurrency < 1 or bootstrap < 1 or timeout <= 0:
        raise _fail(ValueError("--concurrency and --bootstrap must be at least 1, --timeout above 0."))
    try:
        if from_scores is not None:
            if candidates or gold or proxy or reuse:
                raise ValueError(
                    "--from-scores recomputes from the raw scores alone: drop --candidates, --gold, --proxy and --reuse."
                )
            report(read_raw(from_scores), out, bootstrap=bootstrap)
            _echo(f"wrote the report to {out}")
            return
        if candidates is None or gold is None or not proxy:
            raise ValueError("pass --candidates, --gold and at least one --proxy (or --from-scores FILE).")
        targets = [parse_target(p) for p in proxy]
        run_bon(
            candidates,
            parse_target(gold, "gold"),
            targets,
            out,
            concurrency=concurrency,
            timeout=timeout,
            bootstrap=bootstrap,
            progress=progress,
            echo=_echo,
            reuse=reuse,
        )
    except (ValueError, FileNotFoundError, LabError) as exc:
        raise _fail(exc) from None
