"""The decoder path every decoder backend shares: padding, final states, scored positions, backbone loading.

Decoder reward models (those with a ``score`` head: Llama, Qwen2, Mistral, Gemma, GPT-NeoX, ...) run
their base model on right-padded batches without an attention mask: under causal attention a token
never sees the padding to its right, so every real token's hidden state equals the unpadded
computation; where padding would cost more, a batch runs as packed rows instead (``rmserve.models.packing``).
The score head (or k heads) reads the final hidden state of each sequence's scored token,
chosen by the model's pooling rule (``rmserve.models.pooling``).

Also here: the meta-device twins of what the backends load (``meta_classifier``, ``meta_base``), so a
backend can describe its modules to the memory planner without reading a weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
)

from rmserve.batching.prefix import PrefixPlan
from rmserve.models.base import resolve_device, resolve_dtype
from rmserve.models.compile import compile_decoder, decoder_hidden_states
from rmserve.models.inputs import EncodedInput, InputEncoder
from rmserve.models.packing import Packing, even_rows, packed_states, packing_for
from rmserve.models.parallel import RowThreads, row_threads, split_evenly
from rmserve.models.pooling import PoolingRule, log_pooling, pooling_rule
from rmserve.models.prefix import base_run, padded_rows, planned_states
from rmserve.models.quantize import check_quantize, finish_quantized, pretrained_kwargs
from rmserve.names import DEFAULT_POOLING, DTypeName, Pooling, QuantizeName

_UNBOUNDED = 1_000_000  # tokenizers report ~1e30 as model_max_length when they know no limit


def base_of(model: nn.Module) -> nn.Module:
    """The base model inside a transformers task model: ``model.<base_model_prefix>``.

    Raises:
        TypeError: ``model`` has no base model under its prefix (not a transformers task model).
    """
    base = getattr(model, str(getattr(model, "base_model_prefix", "")), None)
    if not isinstance(base, nn.Module):
        raise TypeError(f"{type(model).__name__} has no base model under its base_model_prefix.")
    return base


def config_of(model: nn.Module) -> PretrainedConfig:
    """A transformers model's config.

    Raises:
        TypeError: ``model`` carries no ``PretrainedConfig`` (not a transformers model).
    """
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"{type(model).__name__} has no transformers config.")
    return config


def embeddings_of(model: nn.Module) -> nn.Embedding:
    """A transformers model's input embedding table.

    Raises:
        TypeError: its input embeddings are not an ``nn.Embedding``.
    """
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(f"{type(model).__name__}'s input embeddings are not an nn.Embedding.")
    return embeddings


def right_padded(
    batch: Sequence[EncodedInput], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with ``pad_id``, (B, T), and the sequence lengths, (B,)."""
    lengths = torch.tensor([len(x) for x in batch], device=device)  # (B,)
    return padded_rows([x.token_ids for x in batch], pad_id, device), lengths  # (B, T), (B,)


def final_hidden_states(
    base: nn.Module, ids: torch.Tensor, compiled: nn.Module | None = None
) -> torch.Tensor:
    """A decoder base model's final hidden states for right-padded ids, (B, T, H), through its compiled
    forward when given (``rmserve.models.compile``).

    No attention mask: with right padding, causal attention already keeps real tokens off the padding.
    """
    return decoder_hidden_states(base, compiled, ids)  # (B, T, H)


def pooled_hidden_states(
    base: nn.Module, ids: torch.Tensor, lengths: torch.Tensor, pooling: PoolingRule
) -> torch.Tensor:
    """A decoder base model's final hidden state at each sequence's scored token, (B, H)."""
    hidden = final_hidden_states(base, ids)  # (B, T, H)
    rows = torch.arange(ids.shape[0], device=ids.device)  # (B,)
    return hidden[rows, pooling.positions(ids, lengths)]  # (B, H)


def scored_states(
    base: nn.Module,
    batch: Sequence[EncodedInput],
    plan: PrefixPlan | None,
    *,
    pooling: PoolingRule,
    pad_id: int,
    device: torch.device,
    packing: Packing | None = None,
    compiled: nn.Module | None = None,
    threads: RowThreads | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a head reads: final hidden states (B, T, H) and each input's scored position in them, (B,).

    Without a plan: one right-padded forward, positions by the pooling rule, or, when ``packing`` says it
    is cheaper, one packed forward per row (``rmserve.models.packing``), through ``compiled`` (the base's
    compiled forward, ``rmserve.models.compile``) when given. With ``threads`` (a CPU's split forwards,
    ``rmserve.models.parallel``) a batch of several inputs runs in parts side by side: at least one
    packed row per thread, or the padded batch in slices. With a plan: each input's scored state
    computed as the plan says (``rmserve.models.prefix``), eagerly. Split, packed or planned, the states
    come as (B, 1, H) at position 0.
    """
    sizes = [len(x) for x in batch]
    rows = packing.rows(sizes) if plan is None and packing is not None else None
    split = threads if plan is None and len(batch) >= 2 else None
    if split is not None and rows is not None and len(rows) < split.count:  # one row per thread at least
        rows = even_rows(sizes, split.count)
    if rows is not None:
        states = packed_states(
            base,
            batch,
            rows,
            pooling=pooling,
            pad_id=pad_id,
            device=device,
            compiled=compiled,
            threads=threads,
        )  # (B, H)
    elif split is not None:

        def slice_states(rows: range) -> torch.Tensor:
            ids, lengths = right_padded([batch[i] for i in rows], pad_id, device)
            hidden = final_hidden_states(base, ids, compiled)  # (b, T, H)
            return hidden[torch.arange(len(rows), device=device), pooling.positions(ids, lengths)]  # (b, H)

        states = torch.cat(split.map(slice_states, split_evenly(len(batch), split.count)))  # (B, H)
    elif plan is None:
        ids, lengths = right_padded(batch, pad_id, device)
        return final_hidden_states(base, ids, compiled), pooling.positions(ids, lengths)  # (B, T, H), (B,)
    else:
        states = planned_states(base_run(base), batch, plan, pooling=pooling, pad_id=pad_id, device=device)
    return states[:, None, :], torch.zeros(len(batch), dtype=torch.long, device=device)  # (B, 1, H), (B,)


def pad_token_id(tokenizer: object, config: object) -> int:
    """The id to pad with: the tokenizer's pad, else the config's, else EOS (padding is never read)."""
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(config, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    return 0  # padding is never attended to nor scored, any id is correct


def resolve_max_length(config: object, tokenizer: object, requested: int | None) -> int:
    """The token limit per input: ``requested`` if the model allows it, else the model's own limit.

    Raises:
        ValueError: ``requested`` exceeds the model's positions, or nothing states a limit.
    """
    limits = [
        v
        for v in (
            getattr(config, "max_position_embeddings", None),
            getattr(config, "n_positions", None),
            getattr(tokenizer, "model_max_length", None),
        )
        if isinstance(v, int) and 0 < v < _UNBOUNDED
    ]
    model_limit = min(limits) if limits else None
    if requested is None:
        if model_limit is None:
            raise ValueError("the model states no maximum length; set max_length for it in the config.")
        return model_limit
    if model_limit is not None and requested > model_limit:
        raise ValueError(
            f"max_length={requested} exceeds the model's limit of {model_limit} positions; lower max_length."
        )
    return requested


def has_score_head(classifier: nn.Module) -> bool:
    """Whether a sequence classifier is a decoder read at its scored token: its head is a ``score`` Linear."""
    return isinstance(getattr(classifier, "score", None), nn.Linear)


def score_head_of(model: nn.Module) -> nn.Linear:
    """A decoder reward model's ``score`` head.

    Raises:
        ValueError: the model has no ``score`` Linear (not a decoder reward model).
    """
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} is not a decoder reward model with a 'score' head.")
    return head


def is_decoder(config: Any) -> bool:
    """Whether transformers scores this architecture on its last token (a ``score`` head), built on meta."""
    with torch.device("meta"):
        probe = AutoModelForSequenceClassification.from_config(config)
    return has_score_head(probe)


def meta_classifier(config: Any, dtype: torch.dtype) -> nn.Module:
    """A checkpoint's ``AutoModelForSequenceClassification`` (what the dense backend loads), on meta."""
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config, dtype=dtype)


def meta_base(config: Any, dtype: torch.dtype) -> nn.Module:
    """The base model ``load_base`` loads, on meta."""
    if any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or ()):
        return base_of(meta_classifier(config, dtype))
    with torch.device("meta"):
        return AutoModel.from_config(config, dtype=dtype)


def folder_max_length(folder: Path, config: Any, requested: int | None) -> int:
    """The token limit the backend resolves for ``folder`` (``resolve_max_length`` with its tokenizer)."""
    return resolve_max_length(config, AutoTokenizer.from_pretrained(folder), requested)


def load_base(path: Path, config: Any, kwargs: dict[str, Any]) -> nn.Module:
    """The base model of a checkpoint, loaded with ``from_pretrained`` ``kwargs``; a sequence classifier
    is loaded whole and its head dropped, so its weights match one to one (no unexpected-key report)."""
    if any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or ()):
        return base_of(AutoModelForSequenceClassification.from_pretrained(path, **kwargs))
    return AutoModel.from_pretrained(path, **kwargs)


class DecoderBackbone:
    """A decoder base model read at each sequence's scored token (its pooling rule), with its tokenizer.

    Args:
        path: a Hugging Face checkpoint folder (base model, causal LM or sequence classifier).
        dtype: ``auto``, ``float32`` or ``bfloat16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        max_length: the most tokens per input; defaults to the model's own limit.
        quantize: ``none``, ``int8`` or ``nf4``: the base model's linear layers through bitsandbytes
            (``rmserve.models.quantize``).
        pooling: ``hf`` or ``last`` (``rmserve.models.pooling``), against this checkpoint's pad id.
        name: the model's name in the load log.
        max_packed_tokens: the most tokens of a batch run packed (``rmserve.models.packing``); 0: never;
            None: by device.
        compile: run unplanned forwards through torch.compile (``rmserve.models.compile``).
        cpu_row_threads: on the CPU, threads a batch's parts run on side by side
            (``rmserve.models.parallel``; 1: unsplit).

    Raises:
        ValueError: the folder is not a decoder checkpoint, or the options do not fit this machine.
    """

    def __init__(
        self,
        path: Path,
        *,
        dtype: DTypeName = "auto",
        device: str = "auto",
        max_length: int | None = None,
        quantize: QuantizeName = "none",
        pooling: Pooling = DEFAULT_POOLING,
        name: str | None = None,
        max_packed_tokens: int | None = None,
        compile: bool = False,
        cpu_row_threads: int = 1,
    ) -> None:
        if not (path / "config.json").is_file():
            raise ValueError(f"backbone {path} is not a Hugging Face model folder (no config.json).")
        config = AutoConfig.from_pretrained(path)
        if not is_decoder(config):
            raise ValueError(
                f"backbone {path} is a {config.model_type} encoder; reward heads read the last token of a "
                "decoder (Llama, Qwen2, Mistral, GPT-NeoX, ...)."
            )
        self.path = path
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.quantize = check_quantize(quantize)
        kwargs = pretrained_kwargs(self.quantize, dtype=self.dtype, device=self.device, config=config)
        base = load_base(path, config, kwargs)
        finish_quantized(base, self.quantize)
        # a quantised model is already on its device (bitsandbytes quantised it there)
        self.base: nn.Module = (base if self.quantize != "none" else base.to(self.device)).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.pad_id = pad_token_id(tokenizer, config)
        self.pooling = pooling_rule(pooling, config)
        self.packing = packing_for(config, max_packed_tokens, self.device)
        self.compiled = compile_decoder(self.base) if compile else None
        self.threads = row_threads(cpu_row_threads) if self.device.type == "cpu" else None
        log_pooling(name or path.name, self.pooling, tokenizer)
        self.max_length = resolve_max_length(config, tokenizer, max_length)
        embeddings = embeddings_of(self.base)
        self.vocab_size: int = embeddings.num_embeddings
        self.hidden_size: int = embeddings.embedding_dim

    def new_encoder(self, max_length: int | None = None) -> InputEncoder:
        """A fresh encoder with its own tokenizer instance (tokenizers are not thread-safe)."""
        tokenizer = AutoTokenizer.from_pretrained(self.path)
        limit = self.max_length if max_length is None else min(max_length, self.max_length)
        return InputEncoder(tokenizer, max_length=limit, vocab_size=self.vocab_size, text_pairs=False)

    def pooled(self, batch: Sequence[EncodedInput]) -> torch.Tensor:
        """Each input's scored token's final hidden state, (B, H), model dtype, on the device."""
        ids, lengths = right_padded(batch, self.pad_id, self.device)
        return pooled_hidden_states(self.base, ids, lengths, self.pooling)

    @torch.inference_mode()
    def pooled_states(self, batch: Sequence[EncodedInput]) -> torch.Tensor:
        """The hidden state heads read, per input: (B, H) float32 on the CPU."""
        return self.pooled(batch).float().cpu()
