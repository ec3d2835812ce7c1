"""The ``rmserve`` command: flags become ``Settings``; the only place that starts uvicorn.

Each ``serve`` flag is also read from ``RMSERVE_<NAME>`` by the settings (flags win over env vars,
env vars over the YAML config); its help text is the setting's own description.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from pydantic import ValidationError

from rmserve.config import Settings
from rmserve.logs import LogFormat
from rmserve.names import DEMO, DEMO_MODELS, MOE_DEMOS, HeadKind

app = typer.Typer(
    name="rmserve",
    help="Reward-model inference server for RLHF.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _help(name: str) -> str:
    field = Settings.model_fields[name]
    default = "" if field.default is None or field.default_factory else f"default {field.default}; "
    return f"{field.description} ({default}env RMSERVE_{name.upper()})"


def _settings(**flags: Any) -> Settings:
    """Settings from the given flags (None: not given), env vars and the YAML config; exits on error."""
    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except (ValidationError, ValueError) as exc:
        typer.echo(f"error: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None


def _configure_logging(level: str, log_format: LogFormat = "text") -> None:
    from rmserve.logs import configure_logging

    configure_logging(level, log_format)


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help=_help("model"))] = None,
    config: Annotated[Path | None, typer.Option(help=_help("config"))] = None,
    host: Annotated[str | None, typer.Option(help=_help("host"))] = None,
    port: Annotated[int | None, typer.Option(help=_help("port"))] = None,
    dtype: Annotated[str | None, typer.Option(help=_help("dtype"))] = None,
    device: Annotated[str | None, typer.Option(help=_help("device"))] = None,
    kernels: Annotated[str | None, typer.Option(help=_help("kernels"))] = None,
    quantize: Annotated[str | None, typer.Option(help=_help("quantize"))] = None,
    memory_budget: Annotated[str | None, typer.Option(help=_help("memory_budget"))] = None,
    pooling: Annotated[str | None, typer.Option(help=_help("pooling"))] = None,
    max_length: Annotated[int | None, typer.Option(help=_help("max_length"))] = None,
    truncation: Annotated[str | None, typer.Option(help=_help("truncation"))] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help=_help("max_batch_tokens"))] = None,
    max_batch_size: Annotated[int | None, typer.Option(help=_help("max_batch_size"))] = None,
    max_join_padding: Annotated[int | None, typer.Option(help=_help("max_join_padding"))] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help=_help("max_wait_ms"))] = None,
    max_queue_tokens: Annotated[int | None, typer.Option(help=_help("max_queue_tokens"))] = None,
    max_inputs_per_request: Annotated[int | None, typer.Option(help=_help("max_inputs_per_request"))] = None,
    max_request_bytes: Annotated[int | None, typer.Option(help=_help("max_request_bytes"))] = None,
    request_timeout_s: Annotated[float | None, typer.Option(help=_help("request_timeout_s"))] = None,
    shutdown_timeout_s: Annotated[float | None, typer.Option(help=_help("shutdown_timeout_s"))] = None,
    cache_dir: Annotated[Path | None, typer.Option(help=_help("cache_dir"))] = None,
    log_level: Annotated[str | None, typer.Option(help=_help("log_level"))] = None,
    log_format: Annotated[str | None, typer.Option(help=_help("log_format"))] = None,
) -> None:
    """Serve reward models over HTTP (default: the built-in demo models)."""
    settings = _settings(**{k: v for k, v in locals().items()})
    _configure_logging(settings.log_level, settings.log_format)
    for spec in settings.served_models():
        folder = Path(spec.path).expanduser()
        if spec.path not in DEMO_MODELS and not any(
            (folder / f).is_file() for f in ("config.json", "rmserve.json")
        ):
            typer.echo(
                f"error: model {spec.name!r}: {spec.path} is not a model folder (no config.json or rmserve.json).",
                err=True,
            )
            raise typer.Exit(2)
        if spec.path in MOE_DEMOS:
            from rmserve.demo.build import build_demo  # MoE demos are only looked up, never built here

            try:
                build_demo(spec.path, settings.cache_dir)
            except FileNotFoundError as exc:
                raise _fail(exc) from None
    # torch's OpenMP threads spin between parallel regions by default, taking the CPU the event loop and
    # tokenisation threads need (measured: 108 vs 178 requests/s on short inputs with 2 cores). Set before
    # torch is first imported; an explicit OMP_WAIT_POLICY in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from rmserve.api.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep the format configured above for uvicorn's own records
        access_log=False,  # rmserve.access logs every request, with its id, model and timing
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )


@app.command()
def score(
    input_path: Annotated[
        Path, typer.Argument(help="JSONL file: one input object per line (the API's input forms).")
    ],
    model: Annotated[
        str, typer.Option(help="A local model folder or a built-in demo (" + ", ".join(DEMO_MODELS) + ").")
    ] = DEMO,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output JSONL (default: stdout).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help=_help("dtype"))] = None,
    device: Annotated[str | None, typer.Option(help=_help("device"))] = None,
    pooling: Annotated[str | None, typer.Option(help=_help("pooling"))] = None,
    max_length: Annotated[int | None, typer.Option(help=_help("max_length"))] = None,
    truncation: Annotated[str | None, typer.Option(help=_help("truncation"))] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help=_help("max_batch_tokens"))] = None,
    max_batch_size: Annotated[int | None, typer.Option(help=_help("max_batch_size"))] = None,
    max_join_padding: Annotated[int | None, typer.Option(help=_help("max_join_padding"))] = None,
    cache_dir: Annotated[Path | None, typer.Option(help=_help("cache_dir"))] = None,
) -> None:
    """Score a JSONL file offline, with the server's tokenisation and model code.

    Each output line is {"reward", "truncated", "input_tokens"} plus the input's "id" if it had one;
    for models with several heads also "aggregates" (all, default lambdas), "heads" and, for brme, "head_std".
    """
    from rmserve.scoring.loading import load_models
    from rmserve.scoring.offline import read_inputs, score_model

    settings = _settings(
        model=model, dtype=dtype, device=device, pooling=pooling, max_length=max_length, truncation=truncation,
        max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size, max_join_padding=max_join_padding,
        cache_dir=cache_dir,
    )  # fmt: skip
    _configure_logging("warning")
    try:
        inputs, ids = read_inputs(input_path)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    loaded, _ = load_models(settings)
    started = time.perf_counter()
    results = score_model(loaded[0], inputs, settings, progress=True)
    elapsed = time.perf_counter() - started
    out = output.open("w") if output else sys.stdout
    try:
        for row_id, result in zip(ids, results, strict=True):
            row: dict[str, Any] = {} if row_id is None else {"id": row_id}
            row.update(reward=result.reward, truncated=result.truncated, input_tokens=result.input_tokens)
            if len(result.heads) > 1:
                row.update(aggregates=result.aggregates, heads=result.heads)
                if result.head_std is not None:
                    row.update(head_std=result.head_std)
            out.write(json.dumps(row) + "\n")
    finally:
        if output:
            out.close()
    tokens = sum(r.input_tokens for r in results)
    typer.echo(
        f"scored {len(results)} inputs, {tokens} tokens in {elapsed:.1f}s ({tokens / elapsed:.0f} tokens/s)",
        err=True,
    )


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def _parse_member(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise typer.BadParameter(f"{text!r}: give a member as NAME=FOLDER, e.g. --member rm-a=/models/rm-a")
    return name, Path(folder)


@app.command()
def ensemble(
    out: Annotated[Path, typer.Option(help="The ensemble folder to write.")],
    member: Annotated[
        list[str], typer.Option(help="A member as NAME=FOLDER (a dense reward model); repeat for each.")
    ],
    nominal: Annotated[int, typer.Option(help="Index of the nominal member (nominal and tradeoff).")] = 0,
    reward: Annotated[str, typer.Option(help="The aggregate served as 'rewards'.")] = "mean",
    data: Annotated[
        Path | None, typer.Option(help="Reference set to calibrate on now (see rmserve calibrate).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Calibrate on the first N reference inputs.")] = None,
    dtype: Annotated[str | None, typer.Option(help=_help("dtype"))] = None,
    device: Annotated[str | None, typer.Option(help=_help("device"))] = None,
) -> None:
    """Create an ensemble folder from separate reward models (heterologous models allowed)."""
    from rmserve.training.calibration import create_ensemble

    try:
        create_ensemble(out, [_parse_member(m) for m in member], nominal_member=nominal, reward=reward)
    except ValueError as exc:
        raise _fail(exc) from None
    typer.echo(f"wrote {out / 'rmserve.json'}", err=True)
    if data is None:
        typer.echo(f"next: rmserve calibrate {out} --data REFERENCE.jsonl", err=True)
        return
    calibrate(out, data=data, limit=limit, dtype=dtype, device=device)


@app.command()
def calibrate(
    model: Annotated[Path, typer.Argument(help="An ensemble folder (rmserve.json with kind ensemble).")],
    data: Annotated[
        Path,
        typer.Option(
            help="Reference set: JSONL of inputs, or of preference pairs (both responses are scored)."
        ),
    ],
    limit: Annotated[int | None, typer.Option(help="Use the first N reference inputs.")] = None,
    dtype: Annotated[str | None, typer.Option(help=_help("dtype"))] = None,
    device: Annotated[str | None, typer.Option(help=_help("device"))] = None,
) -> None:
    """Compute each ensemble member's reward mean and std on a reference set and store them."""
    from rmserve.training.calibration import calibrate as run_calibration
    from rmserve.training.calibration import read_reference_inputs

    settings = _settings(dtype=dtype, device=device)
    _configure_logging("warning")
    try:
        inputs = read_reference_inputs(data, limit)
        started = time.perf_counter()
        config = run_calibration(
            model, inputs, data_name=data.name, dtype=settings.dtype, device=settings.device
        )
    except ValueError as exc:
        raise _fail(exc) from None
    for m in config.members:
        assert m.calibration is not None
        typer.echo(f"{m.name}: mean {m.calibration.mean:+.4f}, std {m.calibration.std:.4f}", err=True)
    typer.echo(
        f"calibrated {len(config.members)} members on {len(inputs)} inputs in "
        f"{time.perf_counter() - started:.1f}s; wrote {model / 'rmserve.json'}",
        err=True,
    )


@app.command("train-heads")
def train_heads(
    backbone: Annotated[Path, typer.Option(help="A decoder Hugging Face checkpoint folder (kept frozen).")],
    data: Annotated[
        Path, typer.Option(help="Preference pairs, JSONL(.gz), TRL convention (prompt/chosen/rejected).")
    ],
    out: Annotated[Path, typer.Option(help="The model folder to write.")],
    kind: Annotated[
        str, typer.Option(help="multihead (Bradley-Terry heads) or brme (mean and sigma heads).")
    ] = "brme",
    heads: Annotated[int, typer.Option(min=1, help="Number of heads.")] = 5,
    seed: Annotated[int, typer.Option(help="Seeds the data shares, orders and initialisation.")] = 0,
    eval_data: Annotated[
        Path | None, typer.Option(help="Held-out pairs (default: hold out --eval-fraction of --data).")
    ] = None,
    eval_fraction: Annotated[float, typer.Option(help="Share of --data held out when no --eval-data.")] = 0.2,
    max_length: Annotated[int, typer.Option(help="Tokens per input (left truncation).")] = 1024,
    dtype: Annotated[str | None, typer.Option(help=_help("dtype"))] = None,
    device: Annotated[str | None, typer.Option(help=_help("device"))] = None,
) -> None:
    """Train multi-head or BRME reward heads on a frozen backbone; report held-out accuracy per head and aggregate."""
    from rmserve.training.pipeline import train_head_model

    if kind not in ("multihead", "brme"):
        raise _fail(ValueError(f"--kind must be multihead or brme, got {kind!r}."))
    settings = _settings(dtype=dtype, device=device)
    _configure_logging("warning")
    try:
        train, held = _pairs_split(data, eval_data, eval_fraction, seed)
        train_head_model(
            backbone=backbone, train_pairs=train, eval_pairs=held, kind=cast(HeadKind, kind), heads=heads, seed=seed,
            out=out, data_name=data.name, max_length=max_length, dtype=settings.dtype, device=settings.device,
            echo=lambda text: typer.echo(text, err=True),
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None


def _pairs_split(data: Path, eval_data: Path | None, eval_fraction: float, seed: int) -> tuple[list, list]:
    from rmserve.training.pairs import read_preference_pairs
    from rmserve.training.pipeline import split_pairs

    pairs = read_preference_pairs(data)
    if eval_data is not None:
        return pairs, read_preference_pairs(eval_data)
    return split_pairs(pairs, eval_fraction, seed)


@app.command()
def upcycle(
    source: Annotated[Path, typer.Option("--from", help="A dense decoder reward-model folder.")],
    out: Annotated[Path, typer.Option(help="The moe folder to write.")],
    experts: Annotated[int, typer.Option(min=2, help="N: the shared expert plus N - 1 normal experts.")] = 4,
    top_k: Annotated[
        int, typer.Option(min=2, help="K: active experts per token (shared + K - 1 routed).")
    ] = 2,
    last: Annotated[
        int | None, typer.Option(help="Upcycle only the last N decoder layers (default: all).")
    ] = None,
    layer: Annotated[
        list[int] | None, typer.Option(help="A layer to upcycle; repeat (default: all).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the routers' initial weights.")] = 0,
    routing: Annotated[
        str,
        typer.Option(
            help="How the K - 1 selected affinities become weights: xft (UMM-RM eq. 7, as XFT's code: a "
            "softmax over them times s_max) or renorm (renormalised, times s_max); equal when K = 2."
        ),
    ] = "xft",
) -> None:
    """Upcycle a dense reward model into a shared-expert MoE (every expert a copy of the FFN)."""
    from rmserve.training.upcycle import upcycle as run_upcycle
    from rmserve_kernels.routing import ROUTING_RULES

    if routing not in ROUTING_RULES:
        raise _fail(ValueError(f"--routing must be one of {', '.join(ROUTING_RULES)}, got {routing!r}."))
    started = time.perf_counter()
    try:
        config = run_upcycle(
            source, out, experts=experts, top_k=top_k, layers=layer, last=last, seed=seed,
            routing=routing,  # narrowed to RoutingRule by the check above
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        raise _fail(exc) from None
    from rmserve.models.moe import load_moe_classifier

    params = sum(p.numel() for p in load_moe_classifier(out).parameters())
    typer.echo(
        f"upcycled layers {list(config.layers)} into {experts} experts (top-{top_k}, {routing} routing): {params / 1e6:.1f}M parameters, "
        f"in {time.perf_counter() - started:.1f}s; wrote {out}",
        err=True,
    )


@app.command("train")
def train_model(
    model: Annotated[Path, typer.Option(help="A dense or moe reward-model folder.")],
    data: Annotated[Path, typer.Option(help="Preference pairs, JSONL(.gz), TRL convention.")],
    out: Annotated[Path, typer.Option(help="The folder to write (checkpoints in checkpoint-epoch-N/).")],
    trainable: Annotated[
        str, typer.Option("--train", help="all, experts (MoE experts, routers, norm, head) or head.")
    ] = "experts",
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    lr: Annotated[float, typer.Option()] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per step.")] = 8,
    bsr: Annotated[float, typer.Option(help="BSR regulariser weight on mean(reward)^2 (0 disables).")] = 1e-3,
    aux: Annotated[float, typer.Option(help="Load-balancing loss weight for MoE routers.")] = 1e-2,
    max_length: Annotated[int, typer.Option(help="Tokens per input (left truncation).")] = 512,
    eval_data: Annotated[
        Path | None, typer.Option(help="Held-out pairs (default: hold out --eval-fraction).")
    ] = None,
    eval_fraction: Annotated[float, typer.Option()] = 0.2,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a dense or moe reward model with Bradley-Terry loss; held-out accuracy per epoch."""
    from rmserve.training.trainer import Trainable, TrainOptions, train

    if trainable not in ("all", "experts", "head"):
        raise _fail(ValueError(f"--train must be all, experts or head, got {trainable!r}."))
    _configure_logging("warning")
    options = TrainOptions(
        trainable=cast(Trainable, trainable),  # checked above
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        bsr=bsr,
        aux=aux,
        max_length=max_length,
        seed=seed,
    )
    try:
        train_pairs, held = _pairs_split(data, eval_data, eval_fraction, seed)
        train(model, train_pairs, held, out, options, echo=lambda text: typer.echo(text, err=True))
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None


@app.command()
def merge(
    moe: Annotated[Path, typer.Option(help="A moe folder (rmserve upcycle / train).")],
    out: Annotated[Path, typer.Option(help="The dense folder to write (vanilla transformers loads it).")],
    shared_rate: Annotated[
        float, typer.Option(help="lambda: the shared expert's fixed merging weight, in [0, 1).")
    ] = 0.5,
    data: Annotated[
        Path | None, typer.Option(help="Preference pairs to learn the merging weights on (default: uniform).")
    ] = None,
    eval_data: Annotated[
        Path | None, typer.Option(help="Held-out pairs (default: hold out --eval-fraction of --data).")
    ] = None,
    eval_fraction: Annotated[float, typer.Option()] = 0.2,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    lr: Annotated[float, typer.Option()] = 0.05,
    max_length: Annotated[int, typer.Option()] = 512,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Merge a moe model's experts back into a plain dense reward model (UMM-RM eq. 8-9)."""
    from rmserve.training.merge import merge as run_merge

    _configure_logging("warning")
    try:
        train_pairs, held = _pairs_split(data, eval_data, eval_fraction, seed) if data else ([], [])
        record = run_merge(
            moe, out, shared_rate=shared_rate, train_pairs=train_pairs, eval_pairs=held, epochs=epochs, lr=lr,
            max_length=max_length, seed=seed, echo=lambda text: typer.echo(text, err=True),
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    typer.echo(f"merged in {record['seconds']:.1f}s", err=True)


demo_app = typer.Typer(help="The built-in demo reward model (SmolLM2-135M-Instruct with a trained head).")
app.add_typer(demo_app, name="demo")


@demo_app.command("build")
def demo_build(cache_dir: Annotated[Path | None, typer.Option(help=_help("cache_dir"))] = None) -> None:
    """Assemble the demo model into the cache (done automatically on first use)."""
    from rmserve.demo.build import build_demo_model

    settings = _settings(cache_dir=cache_dir)
    typer.echo(build_demo_model(settings.cache_dir))


@demo_app.command("build-moe")
def demo_build_moe(
    data: Annotated[
        Path, typer.Option(help="The HH-RLHF harmless-base test split (JSONL.gz; " + _HH_IN_CHECKOUT + ").")
    ],
    cache_dir: Annotated[Path | None, typer.Option(help=_help("cache_dir"))] = None,
    evaluate: Annotated[
        bool,
        typer.Option(
            help="Then measure demo, demo-moe and demo-merged on the 462 held-out pairs (about 8 minutes)."
        ),
    ] = False,
) -> None:
    """Build demo-moe and demo-merged into the cache: UMM-RM's upcycle, train and merge on the demo (about
    four minutes on 2 cores); the server then serves them with --model demo-moe / demo-merged."""
    from rmserve.training.recipes.demo_moe import build_moe_demos, evaluate_moe_demos

    settings = _settings(cache_dir=cache_dir)
    try:
        moe_dir, merged_dir = build_moe_demos(settings.cache_dir, data)
        typer.echo(f"{moe_dir}\n{merged_dir}")
        if evaluate:
            typer.echo(json.dumps(evaluate_moe_demos(settings.cache_dir, data), indent=2))
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None


@demo_app.command("train-head")
def demo_train_head(
    data: Annotated[
        Path | None, typer.Option(help="HH-RLHF JSONL(.gz) file (default: " + _HH_IN_CHECKOUT + ").")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the head (default: the shipped asset).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help=_help("cache_dir"))] = None,
) -> None:
    """Train the demo model's score head on HH-RLHF pairs (frozen backbone) and report held-out accuracy."""
    from dataclasses import asdict

    from rmserve.demo.build import HEAD_PATH
    from rmserve.training.recipes.demo_head import train_demo_head

    settings = _settings(cache_dir=cache_dir)
    given = [*(["--data", str(data)] if data else []), *(["--out", str(out)] if out else [])]
    try:
        report = train_demo_head(
            data or _hh_in_checkout(), settings.cache_dir, out or HEAD_PATH,
            command=" ".join(["rmserve demo train-head", *given]),
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps(asdict(report), indent=2))


@demo_app.command("train-heads")
def demo_train_heads(
    data: Annotated[
        Path | None, typer.Option(help="HH-RLHF JSONL(.gz) file (default: " + _HH_IN_CHECKOUT + ").")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help=_help("cache_dir"))] = None,
) -> None:
    """Train the heads of demo-brme and demo-ensemble on HH-RLHF pairs (frozen backbone) into the shipped assets."""
    from rmserve.training.recipes.demo_heads import train_demo_heads

    settings = _settings(cache_dir=cache_dir)
    try:
        records = train_demo_heads(data or _hh_in_checkout(), settings.cache_dir)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps(records, indent=2))


_HH_IN_CHECKOUT = "in a checkout: ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz"


def _hh_in_checkout() -> Path:
    """The HH-RLHF file beside a source checkout, for the recipes that made the shipped assets."""
    from rmserve.training.hh import default_data_path
    from rmserve.training.recipes.demo_head import REPO_ROOT

    return default_data_path(REPO_ROOT)
