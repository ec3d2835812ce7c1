"""The ``rmserve`` command: flags become ``Settings``; the only place that starts uvicorn.

Each ``serve`` flag is also read from ``RMSERVE_<NAME>`` by the settings (flags win over env vars,
env vars over the YAML config); its help text is the setting's own description.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from rmserve.config import DEMO, Settings

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


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help=_help("model"))] = None,
    config: Annotated[Path | None, typer.Option(help=_help("config"))] = None,
    host: Annotated[str | None, typer.Option(help=_help("host"))] = None,
    port: Annotated[int | None, typer.Option(help=_help("port"))] = None,
    dtype: Annotated[str | None, typer.Option(help=_help("dtype"))] = None,
    device: Annotated[str | None, typer.Option(help=_help("device"))] = None,
    max_length: Annotated[int | None, typer.Option(help=_help("max_length"))] = None,
    truncation: Annotated[str | None, typer.Option(help=_help("truncation"))] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help=_help("max_batch_tokens"))] = None,
    max_batch_size: Annotated[int | None, typer.Option(help=_help("max_batch_size"))] = None,
    max_join_padding: Annotated[int | None, typer.Option(help=_help("max_join_padding"))] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help=_help("max_wait_ms"))] = None,
    max_queue_tokens: Annotated[int | None, typer.Option(help=_help("max_queue_tokens"))] = None,
    max_inputs_per_request: Annotated[int | None, typer.Option(help=_help("max_inputs_per_request"))] = None,
    max_request_bytes: Annotated[int | None, typer.Option(help=_help("max_request_bytes"))] = None,
    shutdown_timeout_s: Annotated[float | None, typer.Option(help=_help("shutdown_timeout_s"))] = None,
    cache_dir: Annotated[Path | None, typer.Option(help=_help("cache_dir"))] = None,
    log_level: Annotated[str | None, typer.Option(help=_help("log_level"))] = None,
) -> None:
    """Serve reward models over HTTP (default: the built-in demo model)."""
    settings = _settings(**{k: v for k, v in locals().items()})
    _configure_logging(settings.log_level)
    for spec in settings.served_models():
        if spec.path != DEMO and not (Path(spec.path).expanduser() / "config.json").is_file():
            typer.echo(
                f"error: model {spec.name!r}: {spec.path} is not a Hugging Face model folder (no config.json).",
                err=True,
            )
            raise typer.Exit(2)
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
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )


@app.command()
def score(
    input_path: Annotated[
        Path, typer.Argument(help="JSONL file: one input object per line (the API's input forms).")
    ],
    model: Annotated[str, typer.Option(help="A local Hugging Face folder or 'demo'.")] = DEMO,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output JSONL (default: stdout).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help=_help("dtype"))] = None,
    device: Annotated[str | None, typer.Option(help=_help("device"))] = None,
    max_length: Annotated[int | None, typer.Option(help=_help("max_length"))] = None,
    truncation: Annotated[str | None, typer.Option(help=_help("truncation"))] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help=_help("max_batch_tokens"))] = None,
    max_batch_size: Annotated[int | None, typer.Option(help=_help("max_batch_size"))] = None,
    max_join_padding: Annotated[int | None, typer.Option(help=_help("max_join_padding"))] = None,
    cache_dir: Annotated[Path | None, typer.Option(help=_help("cache_dir"))] = None,
) -> None:
    """Score a JSONL file offline, with the server's tokenisation and model code.

    Each output line is {"reward", "truncated", "input_tokens"} plus the input's "id" if it had one.
    """
    from rmserve.offline import read_inputs, score_model
    from rmserve.serving import load_models

    settings = _settings(
        model=model, dtype=dtype, device=device, max_length=max_length, truncation=truncation,
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
            out.write(json.dumps(row) + "\n")
    finally:
        if output:
            out.close()
    tokens = sum(r.input_tokens for r in results)
    typer.echo(
        f"scored {len(results)} inputs, {tokens} tokens in {elapsed:.1f}s ({tokens / elapsed:.0f} tokens/s)",
        err=True,
    )


demo_app = typer.Typer(help="The built-in demo reward model (SmolLM2-135M-Instruct with a trained head).")
app.add_typer(demo_app, name="demo")


@demo_app.command("build")
def demo_build(cache_dir: Annotated[Path | None, typer.Option(help=_help("cache_dir"))] = None) -> None:
    """Assemble the demo model into the cache (done automatically on first use)."""
    from rmserve.demo import build_demo_model

    settings = _settings(cache_dir=cache_dir)
    typer.echo(build_demo_model(settings.cache_dir))


@demo_app.command("train-head")
def demo_train_head(
    data: Annotated[
        Path | None, typer.Option(help="HH-RLHF JSONL(.gz) file (default: ../shared/data).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the head (default: the shipped asset).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help=_help("cache_dir"))] = None,
) -> None:
    """Train the demo model's score head on HH-RLHF pairs (frozen backbone) and report held-out accuracy."""
    from rmserve.training import demo_head

    argv = [*(["--data", str(data)] if data else []), *(["--out", str(out)] if out else [])]
    argv += ["--cache-dir", str(_settings(cache_dir=cache_dir).cache_dir)]
    demo_head.main(argv)
