"""Prefix caching for training: run the frozen lower layers once, then train only the layers above.

When every layer below layer L stays frozen, the hidden states entering L are computed once per
input (``prefix_states``) and fed back as ``inputs_embeds`` while the model's own forward runs only
layers L and up (``frozen_prefix``): its rotary embeddings and causal mask depend only on positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rmserve.models.decoder import base_of, config_of
from rmserve.models.moe import decoder_layers


@contextmanager
def frozen_prefix(model: nn.Module, first_trained_layer: int) -> Iterator[None]:
    """Within the block, the base model starts at ``first_trained_layer`` from ``inputs_embeds``.

    Training that leaves layers ``0 .. first_trained_layer - 1`` frozen feeds the cached hidden states
    entering that layer as ``inputs_embeds``: the model's own forward then runs only the later layers
    (its rotary embeddings and causal mask depend only on positions).
    """
    stack = decoder_layers(model)
    base = base_of(model)
    types = getattr(config_of(model), "layer_types", None)
    if types and len(set(types)) > 1:
        raise ValueError("prefix caching needs one attention type for every layer; train without it.")
    saved = base.layers
    base.layers = nn.ModuleList(list(stack)[first_trained_layer:])
    try:
        yield
    finally:
        base.layers = saved


@torch.no_grad()
def prefix_states(model: nn.Module, ids: torch.Tensor, first_trained_layer: int) -> torch.Tensor:
    """The hidden states entering ``first_trained_layer`` (the final norm when it is the layer count).

    Returns:
        (B, T, H), for right-padded ids without a mask.
    """
    captured: list[torch.Tensor] = []
    stack = decoder_layers(model)

    def grab(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    base = base_of(model)
    target = stack[first_trained_layer] if first_trained_layer < len(stack) else final_norm(base)
    handle = target.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        base(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def final_norm(base: nn.Module) -> nn.Module:
    """The base model's final norm (``norm`` or ``final_layer_norm``)."""
    for name in ("norm", "final_layer_norm"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(base).__name__} has no final norm named norm or final_layer_norm.")


class _Stop(Exception):
    """Ends a forward once the wanted hidden states are captured."""
