"""UMM-RM's upcycled MoE layer (shared expert + routed SwiGLU experts), and the choice of its implementation.

This module owns the math of one MoE layer that replaces a decoder layer's FFN (UMM-RM, section 3.1,
eq. 5-7), on the flattened tokens of a batch, x (T, H): ``(1 - s_max) * shared(x)`` plus the routed
experts, from the routing of ``rmserve_kernels.routing`` and the grouped experts of
``rmserve_kernels.experts``; and ``MoeKernels``, the three steps (route, grouped SwiGLU, layer) of one
implementation, which ``select_moe_kernels`` picks, once, when a model is loaded (same rules as
``rmserve_kernels.heads.select_heads_aggregate``).

``moe_layer_reference`` defines the semantics in plain torch, all math in float32, and is differentiable
(the router learns through g_i and 1 - s_max, so training uses it); ``moe_layer_triton`` computes the same
with the routing and grouped kernels, forward only, and matches it to 1e-5 in float32.

Triton is optional: without it this module imports and the references work (see ``rmserve_kernels.heads``
for why ``TRITON_INTERPRET`` must be exported before the process starts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from rmserve_kernels._moe_shared import check_devices, check_float, ready_for_kernels
from rmserve_kernels.experts import JIT_KERNELS as EXPERTS_JIT_KERNELS
from rmserve_kernels.experts import (
    grouped_reference_f32,
    grouped_rows_triton,
    grouped_swiglu_reference,
    grouped_swiglu_triton,
    swiglu_f32,
    validate_experts,
)
from rmserve_kernels.routing import JIT_KERNELS as ROUTE_JIT_KERNELS
from rmserve_kernels.routing import Routing, RoutingRule, route_reference, route_triton, validate_route
from rmserve_kernels.selection import use_triton

__all__ = [
    "REFERENCE_KERNELS",
    "TRITON_KERNELS",
    "MoeKernels",
    "moe_layer_reference",
    "moe_layer_triton",
    "select_moe_kernels",
]

Swiglu = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One SwiGLU FFN's weights: gate (F, H), up (F, H), down (H, F)."""


def _validate_shared(x: torch.Tensor, shared: Swiglu) -> None:
    if not isinstance(shared, tuple) or len(shared) != 3:
        raise ValueError("shared must be the shared expert's (gate (F, H), up (F, H), down (H, F)) tuple.")
    gate, up, down = shared
    check_float("shared gate", gate, (-1, x.shape[1]), "the shared expert's gate projection")
    check_float("shared up", up, tuple(gate.shape), "shaped like the shared gate")
    check_float("shared down", down, (x.shape[1], gate.shape[0]), "the shared expert's down projection")
    check_devices(x, {"shared gate": gate, "shared up": up, "shared down": down})


def _validate_layer(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    shared: Swiglu,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
) -> None:
    validate_route(x, router_weight, top_k)
    validate_experts(x, gate, up, down)
    if router_weight.shape[0] != gate.shape[0]:
        raise ValueError(
            f"router_weight routes to {router_weight.shape[0]} experts but gate stacks {gate.shape[0]}; the "
            "router needs one row per normal expert."
        )
    _validate_shared(x, shared)


def moe_layer_reference(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    shared: Swiglu,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    rule: RoutingRule = "xft",
) -> torch.Tensor:
    """One UMM-RM MoE layer (the FFN's replacement, residual not included), in plain torch and float32.

    Args:
        x: the tokens' hidden states, (T, H), any float dtype.
        router_weight: the router, (N-1, H).
        shared: the shared expert's (gate (F, H), up (F, H), down (H, F)).
        gate: the N-1 normal experts' gate projections, (N-1, F, H).
        up: their up projections, (N-1, F, H).
        down: their down projections, (N-1, H, F).
        top_k: K-1, the normal experts per token.
        rule: the routing rule, ``xft`` or ``renorm`` (``rmserve_kernels.routing``).

    Returns:
        (T, H) in x.dtype: ``(1 - s_max) * shared(x_t) + sum_i g_i * expert_i(x_t)``.

    Raises:
        ValueError: shapes that do not fit, ``top_k`` out of range, an unknown rule, or tensors on other
            devices.
    """
    _validate_layer(x, router_weight, shared, gate, up, down, top_k)
    routing = route_reference(x, router_weight, top_k, rule)
    shared_out = swiglu_f32(x.float(), *shared)  # (T, H)
    routed = grouped_reference_f32(x, gate, up, down, routing)  # (T, H)
    return (routing.shared_weight[:, None] * shared_out + routed).to(x.dtype)


# The triton.jit functions moe_layer_triton launches (routing, then the grouped experts); None without
# Triton.
_JIT_KERNELS = (
    (*ROUTE_JIT_KERNELS, *EXPERTS_JIT_KERNELS)
    if ROUTE_JIT_KERNELS is not None and EXPERTS_JIT_KERNELS is not None
    else None
)


@torch.no_grad()
def moe_layer_triton(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    shared: Swiglu,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    rule: RoutingRule = "xft",
) -> torch.Tensor:
    """``moe_layer_reference`` with the Triton routing and grouped kernels; same arguments, within 1e-5.

    The shared expert runs through the grouped kernel too, as a single expert holding every token with
    weight 1 - s_max: float32 accumulation and tensor cores for bf16, with no copy of its weights.
    No host sync: the routing comes from the kernel, so its indices are not checked.

    Raises:
        ValueError: what ``moe_layer_reference`` or ``route_triton`` reject; Triton not installed; tensors
            neither on CUDA nor on the CPU under ``TRITON_INTERPRET=1``.
    """
    _validate_layer(x, router_weight, shared, gate, up, down, top_k)
    ready_for_kernels("moe_layer_triton", x.device, _JIT_KERNELS)
    routing = route_triton(x, router_weight, top_k, rule)
    tokens, hidden = x.shape
    routed = grouped_rows_triton(x, gate, up, down, routing.expert_index, routing.expert_weight)  # (T*k, H)
    shared_gate, shared_up, shared_down = (w.unsqueeze(0) for w in shared)  # (1, F, H), (1, F, H), (1, H, F)
    everyone = torch.zeros((tokens, 1), dtype=torch.long, device=x.device)  # (T, 1)
    shared_out = grouped_rows_triton(
        x, shared_gate, shared_up, shared_down, everyone, routing.shared_weight[:, None]
    )  # (T, H)
    return (shared_out + routed.view(tokens, top_k, hidden).sum(dim=1)).to(x.dtype)


# --- choosing an implementation -------------------------------------------------------------------------


class _Route(Protocol):
    def __call__(
        self, x: torch.Tensor, router_weight: torch.Tensor, top_k: int, rule: RoutingRule = "xft"
    ) -> Routing: ...


class _GroupedSwiglu(Protocol):
    def __call__(
        self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, routing: Routing
    ) -> torch.Tensor: ...


class _MoeLayer(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        router_weight: torch.Tensor,
        shared: Swiglu,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        top_k: int,
        rule: RoutingRule = "xft",
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class MoeKernels:
    """One implementation of each MoE step: all references (differentiable) or all Triton (forward only)."""

    route: _Route
    grouped_swiglu: _GroupedSwiglu
    moe_layer: _MoeLayer


REFERENCE_KERNELS = MoeKernels(route_reference, grouped_swiglu_reference, moe_layer_reference)
TRITON_KERNELS = MoeKernels(route_triton, grouped_swiglu_triton, moe_layer_triton)


def select_moe_kernels(
    device: torch.device, kernels: Literal["auto", "triton", "reference"] = "auto"
) -> MoeKernels:
    """The MoE implementation for a model on ``device``, chosen once at load time.

    Args:
        device: where the model (and so its hidden states) lives.
        kernels: ``reference`` (plain torch), ``triton`` (the kernels, or an error saying why they cannot
            run), or ``auto``: Triton on CUDA, the references elsewhere. ``auto`` never falls back
            silently: on CUDA without Triton it raises.

    Returns:
        ``TRITON_KERNELS`` or ``REFERENCE_KERNELS``.

    Raises:
        ValueError: an unknown ``kernels``; Triton asked for (or ``auto`` on CUDA) but not installed;
            ``triton`` on a device that is neither CUDA nor the CPU under ``TRITON_INTERPRET=1``.
    """
    if use_triton(device, kernels, jit_kernels=_JIT_KERNELS):
        return TRITON_KERNELS
    return REFERENCE_KERNELS
