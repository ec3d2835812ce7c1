"""Memory planning: what each served model will take on its device, and whether the models fit.

- ``rmserve.memory.estimate``: one model's weights and activation peak, from its folder, before loading.
- ``rmserve.memory.plan``: each device's budget, and the check that the models on it fit.
"""

from rmserve.memory.estimate import (
    FORWARD_FIXED_BYTES,
    NF4_CODES,
    ForwardShape,
    ModelEstimate,
    Transformer,
    activation_bytes,
    check_checkpoint,
    checkpoint_shapes,
    device_key,
    estimate_model,
    format_bytes,
    quantized_bytes,
)
from rmserve.memory.plan import (
    GPU_BUDGET_FRACTION,
    DevicePlan,
    MemoryBudgetError,
    MemoryPlan,
    available_ram,
    device_budget,
    plan_memory,
    plan_served_models,
)

__all__ = [
    "FORWARD_FIXED_BYTES",
    "GPU_BUDGET_FRACTION",
    "NF4_CODES",
    "DevicePlan",
    "ForwardShape",
    "MemoryBudgetError",
    "MemoryPlan",
    "ModelEstimate",
    "Transformer",
    "activation_bytes",
    "available_ram",
    "check_checkpoint",
    "checkpoint_shapes",
    "device_budget",
    "device_key",
    "estimate_model",
    "format_bytes",
    "plan_memory",
    "plan_served_models",
    "quantized_bytes",
]
