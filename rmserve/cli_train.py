"""The ``rmserve`` commands that make models: ``upcycle``, ``train``, ``merge``, ``merge-lora``, ``train-heads``,
``train-branches`` and ``train-dmoerm``. Each reads preference pairs, reports held-out accuracy, and writes a model folder
with its training record; the heavy imports happen inside each command, so ``rmserve --help`` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from rmserve.cli_support import configure_logging as _configure_logging
from rmserve.cli_support import fail as _fail
from rmserve.cli_support import load_settings as _settings
from rmserve.cli_support import pairs_split as _pairs_split
from rmserve.cli_support import setting_help as _help
from rmserve.names import TRAINABLE_HELP, HeadKind

if TYPE_CHECKING:
    from rmserve.training.trainer import BsrForm, BsrScaling

BSR_FORM_HELP = (
    "square-of-mean: mean(r)^2 over the batch (eq. 25); mean-of-squares: mean(r^2) (eq. 28's gradient)."
)
BSR_SCALING_HELP = "none: the weight is --bsr; batch: --bsr x pairs per step, as the BSR authors' code."

training = typer.Typer()
dmoerm = typer.Typer(help="DMoERM's data tools: capability labels for train-dmoerm.", no_args_is_help=True)


@training.command("train-heads")
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
    bsr: Annotated[
        float, typer.Option(help="brme: BSR's weight on mean(mu)^2 per stage-2 step (eq. 25; 0: none).")
    ] = 0.0,
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
            out=out, data_name=data.name, max_length=max_length, bsr=bsr, dtype=settings.dtype, device=settings.device,
            echo=lambda text: typer.echo(text, err=True),
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None


@training.command()
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


@training.command("train")
def train_model(
    model: Annotated[Path, typer.Option(help="A dense or moe reward-model folder.")],
    data: Annotated[Path, typer.Option(help="Preference pairs, JSONL(.gz), TRL convention.")],
    out: Annotated[Path, typer.Option(help="The folder to write (checkpoints in checkpoint-epoch-N/).")],
    trainable: Annotated[str, typer.Option("--train", help=TRAINABLE_HELP + ".")] = "experts",
    lora_rank: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Train LoRA adapters of this rank (peft) on the --train layers, plus the head; "
            "writes a peft adapter folder (kind lora).",
        ),
    ] = None,
    lora_targets: Annotated[
        str, typer.Option(help="The projections LoRA adapts, comma-separated.")
    ] = "q_proj,v_proj",
    lora_alpha: Annotated[
        int | None, typer.Option(min=1, help="LoRA alpha (scale alpha / rank; default 2 x rank).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    lr: Annotated[float, typer.Option()] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per step.")] = 8,
    bsr: Annotated[
        float, typer.Option(help="BSR lambda (0 disables; see --bsr-form, --bsr-scaling).")
    ] = 1e-3,
    bsr_form: Annotated[str, typer.Option(help=BSR_FORM_HELP)] = "square-of-mean",
    bsr_scaling: Annotated[str, typer.Option(help=BSR_SCALING_HELP)] = "none",
    aux: Annotated[float, typer.Option(help="Load-balancing loss weight for MoE routers.")] = 1e-2,
    max_length: Annotated[int, typer.Option(help="Tokens per input (left truncation).")] = 512,
    eval_data: Annotated[
        Path | None, typer.Option(help="Held-out pairs (default: hold out --eval-fraction).")
    ] = None,
    eval_fraction: Annotated[float, typer.Option()] = 0.2,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a dense or moe reward model with Bradley-Terry loss (+ BSR); held-out accuracy per epoch."""
    from rmserve.training.lora import lora_spec
    from rmserve.training.trainer import TrainOptions, train

    _configure_logging("warning")
    try:
        lora = lora_spec(lora_rank, lora_targets, lora_alpha)
        options = TrainOptions(
            trainable=trainable, epochs=epochs, lr=lr, batch_size=batch_size, bsr=bsr,
            bsr_form=cast("BsrForm", bsr_form), bsr_scaling=cast("BsrScaling", bsr_scaling),  # checked by TrainOptions
            aux=aux, max_length=max_length, seed=seed, lora=lora,
        )  # fmt: skip
        train_pairs, held = _pairs_split(data, eval_data, eval_fraction, seed)
        train(model, train_pairs, held, out, options, echo=_echo, data_source=str(data))
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None


@training.command("train-branches")
def train_branches(
    model: Annotated[
        Path, typer.Option(help="A dense decoder reward-model folder: the trunk and every branch's start.")
    ],
    data: Annotated[Path, typer.Option(help="Preference pairs, JSONL(.gz), TRL convention.")],
    out: Annotated[Path, typer.Option(help="The branched folder to write.")],
    trainable: Annotated[
        str, typer.Option("--train", help="top:N: each branch's own copy of the top N layers.")
    ],
    kind: Annotated[
        str, typer.Option(help="multihead (a reward per branch) or brme (a mean and a sigma per branch).")
    ] = "multihead",
    branches: Annotated[int, typer.Option(min=1, help="k: how many branches.")] = 4,
    share: Annotated[
        float, typer.Option(help="Each branch trains on its own random share of the pairs, this big.")
    ] = 0.5,
    lora_rank: Annotated[
        int | None,
        typer.Option(min=1, help="Branches as LoRA adapters of this rank (peft) instead of full copies."),
    ] = None,
    lora_targets: Annotated[
        str, typer.Option(help="The projections LoRA adapts, comma-separated.")
    ] = "q_proj,v_proj",
    lora_alpha: Annotated[int | None, typer.Option(min=1, help="LoRA alpha (default 2 x rank).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    lr: Annotated[float, typer.Option()] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per step.")] = 8,
    bsr: Annotated[
        float, typer.Option(help="BSR lambda (0 disables; see --bsr-form, --bsr-scaling).")
    ] = 1e-3,
    bsr_form: Annotated[str, typer.Option(help=BSR_FORM_HELP)] = "square-of-mean",
    bsr_scaling: Annotated[str, typer.Option(help=BSR_SCALING_HELP)] = "none",
    max_length: Annotated[int, typer.Option(help="Tokens per input (left truncation).")] = 512,
    eval_data: Annotated[
        Path | None, typer.Option(help="Held-out pairs (default: hold out --eval-fraction).")
    ] = None,
    eval_fraction: Annotated[float, typer.Option()] = 0.2,
    seed: Annotated[int, typer.Option(help="Branch i uses seed + i (share, order, initialisation).")] = 0,
) -> None:
    """Train a branched model: a shared trunk, k branches of top layers each on its own share of the pairs;
    held-out accuracy per branch and per aggregate."""
    from rmserve.training.branches import BranchOptions
    from rmserve.training.branches import train_branches as run_train_branches
    from rmserve.training.lora import lora_spec
    from rmserve.training.trainer import TrainOptions

    _configure_logging("warning")
    try:
        lora = lora_spec(lora_rank, lora_targets, lora_alpha)
        options = TrainOptions(
            trainable=trainable, epochs=epochs, lr=lr, batch_size=batch_size, bsr=bsr, max_length=max_length,
            bsr_form=cast("BsrForm", bsr_form), bsr_scaling=cast("BsrScaling", bsr_scaling),  # checked by TrainOptions
            seed=seed, lora=lora,
        )  # fmt: skip
        branch = BranchOptions(kind=cast("HeadKind", kind), branches=branches, share=share)  # checked there
        train_pairs, held = _pairs_split(data, eval_data, eval_fraction, seed)
        run_train_branches(model, train_pairs, held, out, options, branch, echo=_echo, data_source=str(data))
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None


@training.command("train-dmoerm")
def train_dmoerm(
    model: Annotated[
        Path, typer.Option(help="A dense decoder reward-model folder: the trunk and every category's start.")
    ],
    data: Annotated[
        Path,
        typer.Option(
            help="Pairs or ranked lists, JSONL(.gz), with capability labels and optional categories "
            "(docs/dmoerm.md)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="The dmoerm folder to write.")],
    top: Annotated[
        int, typer.Option(min=1, help="N: the top layers each category and expert owns (the rest is shared).")
    ] = 2,
    capability: Annotated[
        list[str] | None,
        typer.Option(help="A capability point to train an expert for; repeat (default: every labelled one)."),
    ] = None,
    category: Annotated[str, typer.Option(help="The one category's name when the data has none.")] = "all",
    epochs: Annotated[int, typer.Option(min=1, help="Epochs of phase 1 and of each expert.")] = 1,
    phase1_share: Annotated[
        float, typer.Option(help="Share of each category's items for phase 1; phase 3 gets the rest.")
    ] = 0.6,
    phase1_lr: Annotated[float, typer.Option(help="Phase 1 learning rate.")] = 1e-4,
    expert_lr: Annotated[float, typer.Option(help="Phase 2 (LoRA experts) learning rate.")] = 5e-4,
    lora_rank: Annotated[int, typer.Option(min=1, help="The experts' LoRA rank (the paper: 32).")] = 32,
    lora_alpha: Annotated[int, typer.Option(min=1, help="LoRA alpha (the paper: 32).")] = 32,
    lora_targets: Annotated[
        str, typer.Option(help="The projections LoRA adapts, comma-separated.")
    ] = "q_proj,v_proj",
    lora_dropout: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="LoRA dropout (the paper: 0.05).")
    ] = 0.05,
    mlp_epochs: Annotated[int, typer.Option(min=1, help="Phase 3 (MLP) epochs.")] = 20,
    mlp_lr: Annotated[float, typer.Option(help="Phase 3 learning rate.")] = 1e-3,
    router_epochs: Annotated[int, typer.Option(min=1, help="Router epochs (full batch).")] = 100,
    router_lr: Annotated[float, typer.Option(help="Router learning rate.")] = 1e-2,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per step.")] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens per input (left truncation).")] = 512,
    eval_data: Annotated[
        Path | None, typer.Option(help="Held-out items (default: hold out --eval-fraction of --data).")
    ] = None,
    eval_fraction: Annotated[float, typer.Option()] = 0.2,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a DMoERM model: per category a base (phase 1), a LoRA expert per capability (phase 2) and an MLP
    over the experts (phase 3), plus a router over categories; held-out accuracy per phase."""
    from rmserve.training.dmoerm import DmoermOptions
    from rmserve.training.dmoerm import train_dmoerm as run_train_dmoerm
    from rmserve.training.lora import LoraSpec
    from rmserve.training.pipeline import split_pairs
    from rmserve.training.ranked import read_ranked

    _configure_logging("warning")
    try:
        targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
        lora = LoraSpec(rank=lora_rank, alpha=lora_alpha, targets=targets, dropout=lora_dropout)
        options = DmoermOptions(
            top=top, epochs=epochs, phase1_share=phase1_share, phase1_lr=phase1_lr, expert_lr=expert_lr, lora=lora,
            mlp_epochs=mlp_epochs, mlp_lr=mlp_lr, router_epochs=router_epochs, router_lr=router_lr,
            batch_size=batch_size, max_length=max_length, seed=seed, capabilities=tuple(capability or ()),
            category=category,
        )  # fmt: skip
        items = read_ranked(data)
        train_items, held = (
            (items, read_ranked(eval_data)) if eval_data else split_pairs(items, eval_fraction, seed)
        )
        run_train_dmoerm(model, train_items, held, out, options, echo=_echo, data_source=str(data))
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None


@dmoerm.command("label")
def dmoerm_label(
    data: Annotated[Path, typer.Option(help="Pairs or ranked lists, JSONL(.gz) (docs/dmoerm.md).")],
    out: Annotated[
        Path, typer.Option(help="The labelled file to write (the input with 'capabilities' added).")
    ],
    point: Annotated[
        list[str] | None, typer.Option(help="A capability point the judge labels; repeat.")
    ] = None,
    judge_url: Annotated[
        str | None, typer.Option(help="An OpenAI-compatible endpoint's base URL, ending in /v1.")
    ] = None,
    judge_model: Annotated[str | None, typer.Option(help="The judge model's name at that endpoint.")] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="A file holding the endpoint's API key (sent as a Bearer token).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Judge requests in flight at once.")] = 8,
    max_retries: Annotated[
        int, typer.Option(min=0, help="Retries after a 429, a 5xx or a network error.")
    ] = 5,
    timeout: Annotated[float, typer.Option(min=1.0, help="Seconds one judge request may take.")] = 120.0,
    local: Annotated[
        list[str] | None,
        typer.Option(
            help="POINT=LABELLER, a local labeller: refusal, toxicity, fluency or reward:PATH; repeat."
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="Where answers and verdicts are cached (default: OUT.cache/); reruns resume."),
    ] = None,
) -> None:
    """Label pairs per capability point: an LLM judge asked twice with the responses swapped (position-consistent
    answers only), and/or local labellers; reports each point's agreement with the human ranking."""
    import importlib.util

    if importlib.util.find_spec("httpx") is None:
        raise _fail(ImportError("rmserve dmoerm label calls its judge through httpx: pip install ./clients (in the checkout)."))  # fmt: skip
    from rmserve.training.judge import JudgeError, JudgeOptions
    from rmserve.training.labelling import label_file, parse_local

    _configure_logging("warning")
    try:
        judge = None
        if judge_url is not None or judge_model is not None:
            if judge_url is None or judge_model is None:
                raise ValueError("a judge needs both --judge-url and --judge-model.")
            key = api_key_file.read_text().strip() if api_key_file is not None else None
            judge = JudgeOptions(judge_url, judge_model, key, concurrency, max_retries, timeout)
        elif point:
            raise ValueError("--point names what the judge labels: add --judge-url and --judge-model.")
        pairs = [parse_local(text) for text in local or ()]
        label_file(
            data, out, judge=judge, points=point or (), local=pairs,
            cache_dir=cache or out.with_name(out.name + ".cache"), echo=_echo,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, JudgeError) as exc:
        raise _fail(exc) from None


@training.command("merge-lora")
def merge_lora(
    adapter: Annotated[Path, typer.Option(help="A lora folder (rmserve train --lora-rank).")],
    out: Annotated[Path, typer.Option(help="The dense folder to write (vanilla transformers loads it).")],
) -> None:
    """Merge a LoRA adapter into its base: a plain dense checkpoint, scoring as the adapter does."""
    from rmserve.training.lora import merge_lora as run_merge_lora

    _configure_logging("warning")
    started = time.perf_counter()
    try:
        run_merge_lora(adapter, out)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    _echo(f"merged {adapter} into {out} in {time.perf_counter() - started:.1f}s")


def _echo(text: str) -> None:
    typer.echo(text, err=True)


@training.command()
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
            data_source=str(data) if data else "",
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    typer.echo(f"merged in {record['seconds']:.1f}s", err=True)
