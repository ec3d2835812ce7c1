"""The names every layer shares: option values, model kinds, aggregates and the built-in demos.

Torch-free and import-free (but the standard library), so the settings, the API schemas, the model
backends and the kernels can all read them without pulling each other in. Each name is defined here
once; the modules that use it import it from here.
"""

from __future__ import annotations

from typing import Literal, get_args

DTypeName = Literal["auto", "float32", "bfloat16"]
"""Weights dtype: ``auto`` is bfloat16 on a GPU that supports it, float32 elsewhere (never float16)."""

DeviceName = str
"""``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

Truncation = Literal["left", "right", "error"]
"""Over-long inputs: ``left`` keeps the end, ``right`` the start, ``error`` refuses them (422)."""

QuantizeName = Literal["none", "int8", "nf4"]
"""Weight quantisation through bitsandbytes (``rmserve.models.quantize``)."""

KernelsName = Literal["auto", "triton", "reference"]
"""Head, aggregate, norm and MoE kernels: ``auto`` is Triton on CUDA, the torch reference elsewhere."""

Pooling = Literal["hf", "last"]
"""Which token a decoder scores (``rmserve.models.pooling``): transformers' rule, or the final token."""

DEFAULT_POOLING: Pooling = "hf"

TRAINABLE_HELP = "all, top:N (the top N decoder layers, final norm and head), experts (MoE experts, routers, norm, head) or head"
"""What ``rmserve train --train`` accepts (``rmserve.training.trainer.select_trainable``)."""

ModelKind = Literal["dense", "multihead", "brme", "ensemble", "moe", "lora", "branched", "dmoerm"]
"""The kinds of model folder rmserve serves (``rmserve.models.loader``)."""

KINDS: tuple[ModelKind, ...] = get_args(ModelKind)

KindName = Literal["auto", "dense", "multihead", "brme", "ensemble", "moe", "lora", "branched", "dmoerm"]
"""A configured kind: ``auto`` follows the folder's ``rmserve.json``."""

HeadKind = Literal["multihead", "brme"]
"""The kinds of linear heads on one shared decoder backbone (``rmserve.models.heads``)."""

AggregateName = Literal["mean", "min", "max", "std", "uwo", "nominal", "tradeoff"]
"""The robust aggregates of k head rewards (``rmserve.aggregation``)."""

TradeoffScope = Literal["input", "request"]
"""Where the trade-off's worst case is taken: per input (min over heads) or per request (BRME's min over
heads of the request's mean reward)."""

AGGREGATES: tuple[AggregateName, ...] = get_args(AggregateName)

RewardName = Literal["mean", "min", "max", "std", "uwo", "nominal", "tradeoff", "combined"]
"""What ``rewards`` returns: an aggregate of the heads, or ``combined``, the model's own reward where it
is not an aggregate of its heads (DMoERM's MLP over its experts' states)."""

COMBINED: RewardName = "combined"

DEMO = "demo"
DEMO_BRME = "demo-brme"
DEMO_ENSEMBLE = "demo-ensemble"
DEMO_MOE = "demo-moe"
DEMO_MERGED = "demo-merged"
DEMO_DMOERM = "demo-dmoerm"
DEMO_MODELS = (DEMO, DEMO_BRME, DEMO_ENSEMBLE, DEMO_MOE, DEMO_MERGED, DEMO_DMOERM)
DEFAULT_DEMOS = (DEMO, DEMO_BRME, DEMO_ENSEMBLE)
"""Served when no model is named: built from shipped files only (``rmserve.demo.build``)."""
HEAD_DEMOS = (DEMO_BRME, DEMO_ENSEMBLE)
"""Demos made of shipped heads on the demo backbone."""
MOE_DEMOS = (DEMO_MOE, DEMO_MERGED)
"""Built by ``rmserve demo build-moe`` (a training run), never by the server."""
TRAINED_DEMOS = (*MOE_DEMOS, DEMO_DMOERM)
"""Demos that take a training run to build (``rmserve demo build-moe``, ``build-dmoerm``); the server only
looks them up."""

CPU_JOIN_PADDING = 32
"""Default ``max_join_padding`` on CPU, where padding is nearly pure loss (unlimited on GPU)."""

CPU_PACKED_TOKENS = 2048
"""Default ``max_packed_tokens`` on CPU: decoder batches up to this many tokens may run packed, without
padding (``rmserve.models.packing``); 0 (always padded) on GPU."""

PREFIX_MIN_TOKENS = 32
"""Default shortest prefix shared by several inputs (``rmserve.batching.prefix``): on the 2-core CPU a
separate prefix forward breaks even at about 8 tokens and gains 1.2x at 32 (``bench/prefix.py``,
docs/benchmarks.md); 32 leaves room for devices whose per-forward cost is higher."""
