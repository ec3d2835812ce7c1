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
from typing import Annotated, Any

import typer

from rmserve.cli_lab import lab
from rmserve.cli_runs import runs
from rmserve.cli_support import configure_logging as _configure_logging
from rmserve.cli_support import fail as _fail
from rmserve.cli_support import load_settings as _settings
from rmserve.cli_support import setting_help as _help
from rmserve.cli_train import dmoerm, training
from rmserve.names import DEMO, DEMO_MODELS, TRAINED_DEMOS

app = typer.Typer(
    name="rmserve",
    help="Reward-model inference server for RLHF.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    max_packed_tokens: Annotated[int | None, typer.Option(help=_help("max_packed_tokens"))] = None,
    prefix_min_tokens: Annotated[int | None, typer.Option(help=_help("prefix_min_tokens"))] = None,
    duplicate_cache_entries: Annotated[
        int | None, typer.Option(help=_help("duplicate_cache_entries"))
    ] = None,
    autocast: Annotated[bool | None, typer.Option("--autocast", help=_help("autocast"))] = None,
    compile: Annotated[bool | None, typer.Option("--compile", help=_help("compile"))] = None,
    cpu_row_threads: Annotated[int | None, typer.Option(help=_help("cpu_row_threads"))] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help=_help("max_wait_ms"))] = None,
    max_queue_tokens: Annotated[int | None, typer.Option(help=_help("max_queue_tokens"))] = None,
    max_inputs_per_request: Annotated[int | None, typer.Option(help=_help("max_inputs_per_request"))] = None,
    max_request_bytes: Annotated[int | None, typer.Option(help=_help("max_request_bytes"))] = None,
    request_timeout_s: Annotated[float | None, typer.Option(help=_help("request_timeout_s"))] = None,
    shutdown_timeout_s: Annotated[float | None, typer.Option(help=_help("shutdown_timeout_s"))] = None,
    monitor_window: Annotated[int | None, typer.Option(help=_help("monitor_window"))] = None,
    monitor_max_runs: Annotated[int | None, typer.Option(help=_help("monitor_max_runs"))] = None,
    monitor_max_windows: Annotated[int | None, typer.Option(help=_help("monitor_max_windows"))] = None,
    monitor_baseline_windows: Annotated[
        int | None, typer.Option(help=_help("monitor_baseline_windows"))
    ] = None,
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
        if spec.path in TRAINED_DEMOS:
            from rmserve.demo.build import build_demo  # trained demos are only looked up, never built here

            try:
                build_demo(spec.path, settings.cache_dir)
            except FileNotFoundError as exc:
                raise _fail(exc) from None
    # torch's OpenMP threads spin between parallel regions by default, taking the CPU the event loop and
    # tokenisation threads need (measured: 108 vs 178 requests/s on short inputs with 2 cores). Set before
    # torch is first imported; an explicit OMP_WAIT_POLICY in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # --compile: TorchInductor's generated code kept beside the other caches, so a restart compiles fast
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.cache_dir / "inductor"))
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


@app.command("serve-ray")
def serve_ray(
    model: Annotated[str | None, typer.Option(help=_help("model"))] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML file with settings and a 'models' list (rmserve serve's config)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Where Ray Serve's proxy listens.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The proxy's port.")] = 8000,
    replicas: Annotated[int, typer.Option(help="Replicas (the least, when autoscaling).")] = 1,
    max_replicas: Annotated[
        int | None, typer.Option(help="Autoscale up to this many replicas (default: --replicas, fixed).")
    ] = None,
    num_gpus: Annotated[float, typer.Option(help="GPUs each replica reserves (1 on GPU nodes).")] = 0,
    num_cpus: Annotated[float, typer.Option(help="CPUs each replica reserves.")] = 1,
) -> None:
    """Serve through Ray Serve on a local Ray instance: rmserve replicas behind Ray Serve's proxy.

    Every replica is a whole rmserve server (its models, batcher and routes). On a Ray cluster, deploy
    deploy/ray/serve.yaml with `serve deploy` instead (docs/scaling.md).
    """
    import yaml
    from pydantic import ValidationError

    try:
        from rmserve.deploy.ray import build, run  # the ray extra: pip install 'rmserve[ray]'
    except ImportError as exc:
        raise _fail(ImportError(f"{exc}; serve-ray needs Ray Serve: pip install 'rmserve[ray]'.")) from None
    settings: dict[str, Any] = {}
    if config is not None:
        try:
            settings = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise _fail(exc) from None
    if model is not None:
        settings["model"] = model
    args = {
        "settings": settings, "min_replicas": replicas, "max_replicas": max_replicas or replicas,
        "num_gpus": num_gpus, "num_cpus": num_cpus,
    }  # fmt: skip
    try:
        build(args)  # every argument checked before Ray starts
    except (ValidationError, ValueError) as exc:
        typer.echo(f"error: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    run(args, host=host, port=port)


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
    max_packed_tokens: Annotated[int | None, typer.Option(help=_help("max_packed_tokens"))] = None,
    prefix_min_tokens: Annotated[int | None, typer.Option(help=_help("prefix_min_tokens"))] = None,
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
        max_packed_tokens=max_packed_tokens, prefix_min_tokens=prefix_min_tokens, cache_dir=cache_dir,
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
            if result.category is not None:
                row.update(category=result.category)
            out.write(json.dumps(row) + "\n")
    finally:
        if output:
            out.close()
    tokens = sum(r.input_tokens for r in results)
    typer.echo(
        f"scored {len(results)} inputs, {tokens} tokens in {elapsed:.1f}s ({tokens / elapsed:.0f} tokens/s)",
        err=True,
    )


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


app.add_typer(training)  # upcycle, train, merge, merge-lora, train-heads, train-branches, train-dmoerm
app.add_typer(dmoerm, name="dmoerm")  # label
app.add_typer(lab, name="lab")  # prompts, generate, train-proxies, bon
app.add_typer(runs, name="runs")  # list, plot

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


@demo_app.command("build-dmoerm")
def demo_build_dmoerm(
    data: Annotated[
        Path, typer.Option(help="The HH-RLHF harmless-base test split (JSONL.gz; " + _HH_IN_CHECKOUT + ").")
    ],
    cache_dir: Annotated[Path | None, typer.Option(help=_help("cache_dir"))] = None,
) -> None:
    """Build demo-dmoerm into the cache: local capability labels, then DMoERM's three phases on the demo and the
    HH train split (about an hour on 2 cores, resumable); the server then serves it with --model demo-dmoerm."""
    from rmserve.training.recipes.demo_dmoerm import build_dmoerm_demo

    settings = _settings(cache_dir=cache_dir)
    _configure_logging("warning")
    try:
        typer.echo(build_dmoerm_demo(settings.cache_dir, data))
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
