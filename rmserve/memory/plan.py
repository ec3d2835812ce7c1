"""Device memory budgets, and the check that the served models fit them.

Each model is sized by ``rmserve.memory.estimate``; ``plan_served_models`` estimates every served
model and groups the estimates by device, each device with its budget.

The check, per device: the weights of every model on it plus the largest activation peak among them
must fit the budget. Largest, not summed: ``ModelRegistry`` runs every forward of a device on that
device's one forward thread, so two models' activations never coexist. The budget is
``--memory-budget`` (one value for each device), else 90% of a GPU's memory (the rest is the CUDA
context and allocator fragmentation) or the RAM available on the machine when planning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rmserve.config import ModelSpec, Settings, parse_memory_size
from rmserve.memory.estimate import ModelEstimate, device_key, estimate_model, format_bytes

log = logging.getLogger(__package__)  # rmserve.memory: one logger for the estimates and the plan

GPU_BUDGET_FRACTION = 0.9


class MemoryBudgetError(ValueError):
    """The served models do not fit a device's memory budget."""


def available_ram() -> int:
    """``MemAvailable`` of ``/proc/meminfo``: the RAM new allocations can take without swapping.

    Raises:
        ValueError: the file or the field is missing (not Linux).
    """
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    raise ValueError(
        "cannot read the available RAM (no MemAvailable in /proc/meminfo) to budget the CPU; "
        "set --memory-budget (e.g. 16GiB)."
    )


def device_budget(device: str, budget: str | None = None) -> int:
    """The memory the models on ``device`` may use: ``budget`` if given, else the device's default.

    Default: 90% of a GPU's total memory, or the RAM available now on the CPU.

    Raises:
        ValueError: ``budget`` is not a size, or the device has no default (set ``--memory-budget``).
    """
    if budget is not None:
        return parse_memory_size(budget)
    dev = torch.device(device_key(device))
    if dev.type == "cuda":
        return int(GPU_BUDGET_FRACTION * torch.cuda.get_device_properties(dev).total_memory)
    if dev.type == "cpu":
        return available_ram()
    raise ValueError(f"no default memory budget for device {device!r}; set --memory-budget.")


@dataclass(frozen=True)
class DevicePlan:
    """The models on one device and its budget.

    Forwards on a device run one at a time (one forward thread per device, see ``ModelRegistry``), so
    the device needs every model's resident memory plus the largest activation peak, not their sum.
    """

    device: str
    budget_bytes: int
    models: tuple[ModelEstimate, ...]

    @property
    def resident_bytes(self) -> int:
        return sum(m.weights_bytes for m in self.models)

    @property
    def peak_model(self) -> ModelEstimate:
        """The model whose forward needs the most activation memory."""
        return max(self.models, key=lambda m: m.activation_bytes)

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.peak_model.activation_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def describe(self) -> str:
        peak = self.peak_model
        return (
            f"weights {format_bytes(self.resident_bytes)} + the largest activation peak "
            f"{format_bytes(peak.activation_bytes)} ({peak.name}) = {format_bytes(self.total_bytes)} of a "
            f"{format_bytes(self.budget_bytes)} budget ({100 * self.total_bytes / self.budget_bytes:.0f}%)"
        )


@dataclass(frozen=True)
class MemoryPlan:
    """Every served model's estimate, by device."""

    devices: tuple[DevicePlan, ...]

    def estimate(self, name: str) -> ModelEstimate:
        """The estimate of the model called ``name``.

        Raises:
            KeyError: no planned model has that name.
        """
        for plan in self.devices:
            for model in plan.models:
                if model.name == name:
                    return model
        raise KeyError(f"model {name!r} is not in the memory plan")

    def log(self) -> None:
        """One line per model, then one per device: its total against its budget."""
        for plan in self.devices:
            for model in plan.models:
                log.info("memory plan: %s", model.describe())
            log.info("memory plan: %s total: %s", plan.device, plan.describe())

    def check(self) -> None:
        """Refuse a plan with a device over its budget.

        Raises:
            MemoryBudgetError: lists the device's models with their estimates, the total and the budget,
                and how to make them fit.
        """
        over = [plan for plan in self.devices if not plan.fits]
        if not over:
            return
        lines = []
        for plan in over:
            lines.append(f"the models on {plan.device} do not fit its memory budget:")
            lines += [f"  {model.describe()}" for model in plan.models]
            lines.append(
                f"  total: {plan.describe()}; {format_bytes(plan.total_bytes - plan.budget_bytes)} over "
                "(weights add up; activations do not, as forwards on one device run one at a time)."
            )
        lines.append(
            "Hint: lower max_batch_tokens or max_length (activations grow with them), quantize the weights "
            "(--quantize int8 or nf4), serve fewer models, put some on another device ('device' per model "
            "in the config), or raise --memory-budget if the device really has the room."
        )
        raise MemoryBudgetError("\n".join(lines))


def plan_memory(estimates: Sequence[ModelEstimate], budgets: Mapping[str, int]) -> MemoryPlan:
    """Group estimates by device with each device's budget (devices in order of first use).

    Raises:
        KeyError: a model's device has no budget.
    """
    devices = list(dict.fromkeys(e.device for e in estimates))
    return MemoryPlan(
        tuple(
            DevicePlan(device, budgets[device], tuple(e for e in estimates if e.device == device))
            for device in devices
        )
    )


def plan_served_models(settings: Settings, specs: Sequence[ModelSpec], paths: Sequence[Path]) -> MemoryPlan:
    """Estimate every served model from its folder (per-model settings over server-wide ones), with budgets.

    Args:
        settings: the server settings (``memory_budget``, defaults for unset per-model values).
        specs: the served models.
        paths: each spec's folder, demos already built (``resolve_model_path``).

    Raises:
        ValueError: a folder cannot be estimated, or a budget cannot be determined.
    """
    estimates = [
        estimate_model(
            spec.name,
            path,
            settings.load_options(spec),
            max_batch_tokens=spec.max_batch_tokens or settings.max_batch_tokens,
            max_batch_size=spec.max_batch_size or settings.max_batch_size,
            prefix_sharing=bool(
                settings.prefix_min_tokens if spec.prefix_min_tokens is None else spec.prefix_min_tokens
            ),
        )
        for spec, path in zip(specs, paths, strict=True)
    ]
    budgets = {e.device: device_budget(e.device, settings.memory_budget) for e in estimates}
    return plan_memory(estimates, budgets)
