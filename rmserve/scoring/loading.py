"""Loading the served models: find each folder (building demos), plan their memory, load, warm up."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rmserve.config import ModelSpec, Settings
from rmserve.demo.build import build_demo
from rmserve.memory import MemoryPlan, plan_served_models
from rmserve.models.base import ForwardError, RewardModel, lambdas_for
from rmserve.models.inputs import Text
from rmserve.models.loader import load_model
from rmserve.names import DEMO_MODELS

log = logging.getLogger(__name__)


def resolve_model_path(spec: ModelSpec, cache_dir: Path) -> Path:
    """The folder to load for a spec; ``demo`` is built into ``cache_dir`` on first use."""
    if spec.path in DEMO_MODELS:
        return build_demo(spec.path, cache_dir)
    return Path(spec.path).expanduser()


@dataclass(frozen=True)
class LoadPlan:
    """What ``load_models`` loads: each served model's spec and folder, and their memory plan."""

    specs: list[ModelSpec]
    paths: list[Path]
    memory: MemoryPlan


def plan_loading(settings: Settings) -> LoadPlan:
    """Find every model's folder (building demos), plan their memory and log it, before loading any.

    Raises:
        MemoryBudgetError: the models do not fit a device's budget (the message lists every estimate).
        ValueError: a folder cannot be estimated or a budget determined.
    """
    specs = settings.served_models()
    paths = [resolve_model_path(spec, settings.cache_dir) for spec in specs]
    memory = plan_served_models(settings, specs, paths)
    memory.log()
    memory.check()
    return LoadPlan(specs, paths, memory)


def load_models(
    settings: Settings, plan: LoadPlan | None = None
) -> tuple[list[RewardModel], list[ModelSpec]]:
    """Load every model the settings name (blocking: call it from a worker thread).

    Args:
        settings: the server settings.
        plan: ``plan_loading(settings)`` if already made; made here otherwise, so a configuration over
            its memory budget is refused before any model is loaded.
    """
    plan = plan or plan_loading(settings)
    specs = plan.specs
    models = []
    for spec, path in zip(plan.specs, plan.paths, strict=True):
        started = time.monotonic()
        log.info("loading model %r from %s", spec.name, path)
        model = load_model(spec.name, path, settings.load_options(spec))
        warm_up(model, autocast=settings.autocast if spec.autocast is None else spec.autocast)
        info = model.info
        log.info(
            "loaded %r: %s, %s on %s, quantize %s, %.1fM parameters, %.1f MiB of weights, in %.1fs",
            spec.name,
            info.architecture,
            info.dtype,
            info.device,
            info.quantize,
            info.parameters / 1e6,
            info.weights_bytes / 2**20,
            time.monotonic() - started,
        )
        estimate = plan.memory.estimate(spec.name).total_bytes
        model.info = dataclasses.replace(model.info, memory_estimate_bytes=estimate)
        models.append(model)
    return models, specs


WARM_UP_TEXT = "rmserve warm-up"
LONGER_WARM_UP_TEXT = "rmserve warm-up, a longer text: with the short one, a batch of two lengths"


def warm_up(model: RewardModel, *, autocast: bool = False) -> None:
    """Score one short text on the model's device before the model takes requests.

    The first forward pays the device's one-off costs: the CUDA context and cuBLAS handles and, on the
    Triton path, every kernel's compilation and the autotuning of the smallest batch bucket (larger
    buckets still tune at their first batch, then come from Triton's disk cache). No request waits on
    them. On a CPU it takes about half a second for the demo model. It also checks that the checkpoint
    gives finite rewards. A compiled model (``rmserve.models.compile``) also scores a batch of two equal
    and one of two different lengths, so that each of its graphs (one row; a padded batch; packed rows)
    compiles here, under the autocast setting its forwards run with.

    Raises:
        ForwardError: a non-finite reward for the warm-up text.
        RuntimeError: a compiled model's forward failed to compile.
    """
    started = time.monotonic()
    encoder = model.new_encoder()
    batches = [[WARM_UP_TEXT]]
    if model.info.compiled:
        batches += [[WARM_UP_TEXT, WARM_UP_TEXT], [WARM_UP_TEXT, LONGER_WARM_UP_TEXT]]
    device = model.info.device.split(":")[0]
    for texts in batches:
        encoded = encoder.encode_many([Text(text=t) for t in texts])
        try:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                out = model.score(encoded, **lambdas_for(model.info.defaults, len(texts)))
        except Exception as exc:
            if not model.info.compiled:
                raise
            raise RuntimeError(
                f"model {model.info.name!r}: torch.compile failed at load ({type(exc).__name__}: {exc}); "
                "serve it without --compile (on a CPU, compiling needs a C++ compiler such as g++)."
            ) from exc
        rewards = [out.heads, out.aggregates] + ([] if out.head_std is None else [out.head_std])
        if not all(bool(t.isfinite().all()) for t in rewards):
            raise ForwardError(
                f"model {model.info.name!r} gives a non-finite reward for a short text at load; check the "
                "checkpoint's weights, or use --dtype float32 if it runs in bfloat16."
            )
    action = "compiled and warmed" if model.info.compiled else "warmed"
    log.info("%s %r up in %.2fs", action, model.info.name, time.monotonic() - started)
