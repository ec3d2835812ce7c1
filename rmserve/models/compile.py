"""Compiled decoder forwards (``--compile``): a decoder base model's forward through torch.compile.

TorchInductor fuses the elementwise work around the matmuls (norms, rotary embeddings, activations,
residual adds) into generated kernels, and, with freezing, folds the weights into the compiled graph as
constants: on a CPU it prepacks every linear layer's weight for oneDNN once, instead of at every matmul.
On the 2-core CPU the 4 x 512 model served 1.55x the tokens per second of eager forwards, and scored
one input at a time 1.87x faster offline (``bench/peers.py --regime small``, docs/benchmarks.md). Rewards
stay within float32 rounding of the eager forward (parity: ``tests/models/test_compile.py``). The frozen
copy of the weights costs memory beside the eager module (kept for the eager paths below); the memory
plan counts a compiled model's weights twice.

Compiling costs time once per graph: tens of seconds on a CPU for a small decoder, over a minute for the
135M demo. Shapes are dynamic (``dynamic=True``), so a new batch size or length reuses a graph, but
torch specialises sizes of 1, so a model compiles exactly two graphs, both at load, in the warm-up
(``rmserve.scoring.loading``) before the server is ready:

- one row, with position ids: a single input, and every packed row (``rmserve.models.packing``);
- a right-padded batch of two or more rows, without position ids (causal attention, unmasked).

Everything else runs eagerly, so no request ever waits on a compilation: inputs of one token, and
prefix plans (``rmserve.models.prefix``: their cached keys and values go through transformers' cache
classes, which compile poorly; sharing already saves most of their work). Kinds whose forward has
shapes that depend on the data are refused (``check_compilable``): an MoE layer's tokens per expert
(a count of 0 or 1 would compile a new graph while a request waits), and the branched and DMoERM
models, which run their layers one by one. Inductor keeps its generated
code in an on-disk cache (``TORCHINDUCTOR_CACHE_DIR``; ``rmserve serve`` points it into ``--cache-dir``),
which makes a restart's compilation much faster.
"""

from __future__ import annotations

from typing import cast

import torch
import torch._inductor.config as inductor_config
from torch import nn

COMPILED_KINDS = ("dense", "lora", "multihead", "brme", "ensemble")
"""The model kinds ``--compile`` applies to (decoders whose base model runs as one forward)."""


def check_compilable(name: str, kind: str, quantize: str) -> None:
    """Refuse ``--compile`` for a model it does not apply to.

    Raises:
        ValueError: the kind is not in ``COMPILED_KINDS``, or the weights are quantised.
    """
    if kind not in COMPILED_KINDS:
        raise ValueError(
            f"model {name!r}: --compile applies to {', '.join(COMPILED_KINDS)} models, not {kind} (its forward's "
            "shapes depend on the data, or it runs layer by layer); serve it without compile (compile: false "
            "for this model in the config)."
        )
    if quantize != "none":
        raise ValueError(
            f"model {name!r}: --compile is not supported with --quantize {quantize} (bitsandbytes' layers); "
            "choose one of the two."
        )


def compile_decoder(base: nn.Module) -> nn.Module:
    """``base`` (a transformers decoder base model) compiled, with dynamic shapes; ``base`` itself stays
    eager. Compilation itself happens at the first call of each graph."""
    # freezing: the weights become constants of the graph (serving never changes them). It is read from
    # inductor's process-wide config when a graph compiles (torch.compile's options= does not reach it).
    inductor_config.freezing = True
    return cast(nn.Module, torch.compile(base, dynamic=True))


def decoder_hidden_states(
    base: nn.Module,
    compiled: nn.Module | None,
    ids: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decoder base model's final hidden states, (B, T, H), for ids (B, T), through ``compiled`` when
    given and the shape is one of its two graphs (see the module docstring), else eagerly.

    Args:
        base: the eager base model.
        compiled: ``compile_decoder(base)``, or None.
        ids: token ids, right-padded, (B, T).
        positions: position ids (B, T) for packed rows; None: 0, 1, ... on every row.
    """
    if compiled is None or ids.shape[1] < 2:
        return base(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    if ids.shape[0] == 1:
        if positions is None:  # the one-row graph takes position ids (packed rows do)
            positions = torch.arange(ids.shape[1], device=ids.device)[None, :]  # (1, T)
        return compiled(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    if positions is not None:
        raise ValueError("position ids are for one packed row; a padded batch of several rows takes none.")
    return compiled(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H)
