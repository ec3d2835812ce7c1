"""Dense Hugging Face reward models: any ``AutoModelForSequenceClassification`` with one label.

Decoder models (those with a ``score`` head: Llama, Qwen2, Mistral, Gemma, GPT-NeoX, ...) are run as
their base model on right-padded batches without an attention mask, and the score head is applied to
the hidden state of each sequence's scored token. Under causal attention a token never sees the
padding to its right, so every real token's hidden state equals the unpadded computation. Which token
is scored is the model's pooling rule (``rmserve.models.pooling``): by default exactly transformers'
(the last token that is not the config's pad token), or ``last`` (the final token, OpenRLHF's and vLLM's
convention).

Encoder models (BERT-like cross-encoders, ``classifier`` head) run the full model with an attention
mask: their pooling (CLS) is position-based and unaffected by padding.

A dense model is a one-head model: its answer carries every aggregate, all equal to the reward
(std 0). Decoders apply their score head through the fused head/aggregate kernel on CUDA.

The decoder helpers here (right padding, pooled states, pad id and length limits) are shared
with the multi-head backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig

from rmserve.aggregation import aggregate_rows
from rmserve.batching.prefix import PrefixPlan
from rmserve.config import LoadOptions
from rmserve.models.base import (
    MetaPart,
    ModelInfo,
    module_bytes,
    parameter_count,
    refuse_plan,
    resolve_device,
    resolve_dtype,
)
from rmserve.models.compile import check_compilable, compile_decoder
from rmserve.models.decoder import (
    base_of,
    config_of,
    embeddings_of,
    folder_max_length,
    has_score_head,
    meta_classifier,
    pad_token_id,
    pooled_hidden_states,
    resolve_max_length,
    right_padded,
    scored_states,
)
from rmserve.models.inputs import EncodedInput, InputEncoder
from rmserve.models.packing import packing_for
from rmserve.models.parallel import row_threads
from rmserve.models.pooling import log_pooling, pooling_rule, resolve_pooling
from rmserve.models.quantize import check_quantize, finish_quantized, head_modules, pretrained_kwargs
from rmserve_kernels.heads import HeadOutputs, select_heads_aggregate
from rmserve_kernels.rmsnorm import fuse_rmsnorm


class DenseRewardModel:
    """A single-reward Hugging Face sequence-classification model.

    Args:
        name: the name requests use to pick this model.
        path: a local Hugging Face model folder (config, weights, tokenizer).
        dtype: ``auto``, ``float32`` or ``bfloat16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        max_length: the most tokens per input; defaults to the model's own limit.
        kernels: ``auto`` (Triton on CUDA, torch elsewhere), ``triton`` or ``reference``.
        quantize: ``none``, ``int8`` or ``nf4``: the transformer's linear layers through bitsandbytes
            (``rmserve.models.quantize``); the reward head stays a float ``nn.Linear``.
        pooling: ``hf`` or ``last`` (``rmserve.models.pooling``); None: the folder's ``rmserve.json``
            declaration, else ``hf``.

    Raises:
        ValueError: the folder is not a one-label sequence-classification model, or the options
            do not fit this machine.
    """

    kind = "dense"

    def __init__(
        self,
        name: str,
        path: str | Path,
        options: LoadOptions = LoadOptions(),
    ) -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is not a Hugging Face model folder (no config.json); point --model at a folder "
                "saved with save_pretrained(), or use the built-in 'demo'."
            )
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "num_labels", 1) != 1:
            raise ValueError(
                f"{path} has num_labels={config.num_labels}; a reward model has exactly one output."
            )
        # the checkpoint's own pad id, read before rmserve fills in a missing one below
        self.pooling = pooling_rule(resolve_pooling(options.pooling, path), config)
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.quantize = check_quantize(options.quantize)
        if options.compile:
            check_compilable(name, self.kind, self.quantize)
        self.path = path
        self._tokenizer_path = path
        model = self._load_classifier(path, config)
        # a quantised model is already on its device (bitsandbytes quantised it there)
        self.model: nn.Module = (model if self.quantize != "none" else model.to(self.device)).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model_config = config_of(model)
        self.pad_id = pad_token_id(tokenizer, model_config)
        if model_config.pad_token_id is None:
            model_config.pad_token_id = self.pad_id
        head = getattr(model, "score", None)
        self.decoder = has_score_head(model)
        if self.decoder and type(head) is not nn.Linear:
            raise ValueError(
                f"{path}: the score head loaded as {type(head).__name__}; the head kernel reads a float "
                "nn.Linear, so the head must not be quantised (serve the checkpoint unquantised)."
            )
        self.base = base_of(model) if self.decoder else None
        self.head = head if self.decoder else None
        self.packing = packing_for(config, options.max_packed_tokens, self.device) if self.decoder else None
        if options.compile and not self.decoder:
            raise ValueError(
                f"model {name!r}: --compile compiles decoder forwards; {type(model).__name__} is not a decoder "
                "with a score head, so serve it without compile."
            )
        self.compiled = compile_decoder(self.base) if options.compile and self.base is not None else None
        self.threads = row_threads(options.cpu_row_threads) if self.device.type == "cpu" else None
        if not self.decoder and self.pooling.name != "hf":
            raise ValueError(
                f"{path}: pooling {self.pooling.name!r} is for decoder models; {type(model).__name__} pools "
                "inside the model (its CLS token), so serve it with pooling hf."
            )
        if self.decoder:
            log_pooling(name, self.pooling, tokenizer)
        self.max_length = resolve_max_length(config, tokenizer, options.max_length)
        self._heads_aggregate = select_heads_aggregate(self.device, options.kernels)
        fuse_rmsnorm(self.model, options.kernels)  # logs how many norms run the Triton kernel
        self.vocab_size = embeddings_of(model).num_embeddings
        self.info = ModelInfo(
            name=name,
            kind=self.kind,
            architecture=type(model).__name__,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            max_length=self.max_length,
            parameters=parameter_count(model),
            path=str(path),
            weights_bytes=module_bytes(model),
            quantize=self.quantize,
            pooling=self.pooling.name,
            shares_prefixes=self.decoder,
            compiled=self.compiled is not None,
        )

    @classmethod
    def meta_parts(cls, path: Path, options: LoadOptions) -> list[MetaPart]:
        """The sequence classifier the folder loads as, on meta, with its token limit and float modules."""
        config = AutoConfig.from_pretrained(path)
        classifier = meta_classifier(config, resolve_dtype(options.dtype, resolve_device(options.device)))
        return [
            MetaPart(
                folder=path,
                module=classifier,
                max_length=folder_max_length(path, config, options.max_length),
                masked=not has_score_head(classifier),
                keep=tuple(head_modules(config)),
            )
        ]

    def _load_classifier(self, path: Path, config: PretrainedConfig) -> nn.Module:
        """The folder's sequence classifier, quantised as asked (kinds built on the dense path override it)."""
        kwargs = pretrained_kwargs(self.quantize, dtype=self.dtype, device=self.device, config=config)
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        finish_quantized(model, self.quantize)
        return model

    def new_encoder(self, max_length: int | None = None) -> InputEncoder:
        """A fresh encoder with its own tokenizer instance (tokenizers are not thread-safe).

        Args:
            max_length: a tighter token limit than the model's own.
        """
        tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        limit = self.max_length if max_length is None else min(max_length, self.max_length)
        return InputEncoder(
            tokenizer, max_length=limit, vocab_size=self.vocab_size, text_pairs=not self.decoder
        )

    @torch.inference_mode()
    def score(
        self,
        batch: Sequence[EncodedInput],
        *,
        uwo_lambda: torch.Tensor,
        tradeoff_lambda: torch.Tensor,
        plan: PrefixPlan | None = None,
    ) -> HeadOutputs:
        """The reward (raw logit) of each input as one head, with its aggregates, in batch order; decoders
        run ``plan`` if given (``shares_prefixes``)."""
        if self.decoder:
            assert self.head is not None and self.base is not None
            hidden, positions = scored_states(
                self.base,
                batch,
                plan,
                pooling=self.pooling,
                pad_id=self.pad_id,
                device=self.device,
                packing=self.packing,
                compiled=self.compiled,
                threads=self.threads,
            )  # (B, T, H), (B,)
            out = self._heads_aggregate(
                hidden,
                self.head.weight,
                self.head.bias,
                None,
                None,
                nominal_head=0,
                uwo_lambda=uwo_lambda.to(self.device),
                tradeoff_lambda=tradeoff_lambda.to(self.device),
                eps=0.0,
                positions=positions,
            )
            return HeadOutputs(out.heads.cpu(), None, out.aggregates.cpu())
        else:
            refuse_plan(self.info, plan)
            ids, lengths = right_padded(batch, self.pad_id, self.device)
            mask = torch.arange(ids.shape[1], device=self.device)[None, :] < lengths[:, None]  # (B, T)
            kwargs = {"attention_mask": mask.long()}
            if batch[0].token_type_ids is not None:
                types = torch.zeros_like(ids)  # (B, T)
                for row, item in enumerate(batch):
                    if item.token_type_ids is not None:
                        types[row, : len(item)] = torch.tensor(item.token_type_ids)
                kwargs["token_type_ids"] = types
            logits = self.model(input_ids=ids, **kwargs).logits.float().cpu()  # (B, 1)
        nominal = torch.zeros(len(batch), dtype=torch.long)  # (B,)
        return HeadOutputs(logits, None, aggregate_rows(logits, nominal, uwo_lambda, tradeoff_lambda))

    @torch.inference_mode()
    def pooled_states(self, batch: Sequence[EncodedInput]) -> torch.Tensor:
        """The hidden state the score head reads, per input: (B, H) float32 on the CPU (decoders only)."""
        if not self.decoder:
            raise ValueError(
                f"{self.info.architecture} pools inside the model; pooled states are for decoders."
            )
        assert self.base is not None
        ids, lengths = right_padded(batch, self.pad_id, self.device)
        return pooled_hidden_states(self.base, ids, lengths, self.pooling).float().cpu()
