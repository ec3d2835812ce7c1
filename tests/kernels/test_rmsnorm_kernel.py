"""The fused RMSNorm kernel against its torch reference and transformers' modules, and ``fuse_rmsnorm``.

The kernel tests take ``kernel_device``: the GPU, else Triton's interpreter (see tests/interpreter.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PretrainedConfig,
)
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from rmserve_kernels.rmsnorm import (
    MAX_HIDDEN,
    fuse_rmsnorm,
    rmsnorm_reference,
    rmsnorm_style,
    rmsnorm_triton,
)
from tests.interpreter import needs_triton, rerun_in_the_interpreter


class CastAfterWeightRMSNorm(nn.Module):
    """The form OLMo-hybrid, Helium and others use: weight multiply in float32, cast last (not fusable)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * hidden_states).to(input_dtype)


def norm_inputs(rows: int, hidden: int, *, seed: int, dtype: torch.dtype = torch.float32):
    """Activations (rows, H) ~ N(0, 4) plus an offset, and a weight ~ 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(rows, hidden, generator=g) + 0.5  # (R, H)
    weight = 1 + 0.1 * torch.randn(hidden, generator=g)  # (H,)
    return x.to(dtype), weight.to(dtype)


Model = TypeVar("Model", bound=nn.Module)

# The shape of both tiny models: two layers, H 48, 4 query and 2 key-value heads.
TINY_SHAPE = {
    "vocab_size": 128,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "num_labels": 1,
    "pad_token_id": 0,
}


def tiny_model(
    model_class: Callable[[PretrainedConfig], Model],
    config: PretrainedConfig,
    norm_class: type[nn.Module],
    *,
    seed: int,
    weight_mean: float,
) -> Model:
    """A random ``model_class`` in eval mode whose ``norm_class`` weights are ~ N(weight_mean, 0.2)."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norm_class):
                module.weight.normal_(weight_mean, 0.2)
    return model


def tiny_llama() -> LlamaForSequenceClassification:
    config = LlamaConfig(**TINY_SHAPE, rms_norm_eps=1e-5)
    # Weights away from their init of ones, so a wrong weight use shows.
    return tiny_model(LlamaForSequenceClassification, config, LlamaRMSNorm, seed=0, weight_mean=1.0)


def tiny_gemma() -> GemmaForSequenceClassification:
    config = GemmaConfig(**TINY_SHAPE, head_dim=12)
    # Gemma stores weight - 1: zeros at init would hide a missing "1 +".
    return tiny_model(GemmaForSequenceClassification, config, GemmaRMSNorm, seed=1, weight_mean=0.0)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits  # (B, 1)


# --- the reference is transformers' code ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm])
def test_reference_is_the_llama_module_bit_for_bit(cls, dtype):
    x, weight = norm_inputs(6, 40, seed=0, dtype=dtype)
    module = cls(40, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        want = module(x.view(2, 3, 40))  # (2, 3, H)
    got = rmsnorm_reference(x.view(2, 3, 40), weight, 1e-5)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


def test_reference_promotes_like_the_module_when_the_weight_is_float32():
    # bf16 activations, float32 weight: the normalised row is rounded to bf16, the product is float32.
    x, weight = norm_inputs(4, 32, seed=1)
    module = LlamaRMSNorm(32, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(weight)
        want = module(x.bfloat16())
    got = rmsnorm_reference(x.bfloat16(), weight, 1e-6)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_gemma_is_the_gemma_module_bit_for_bit(dtype):
    x, weight = norm_inputs(5, 24, seed=2, dtype=dtype)
    module = GemmaRMSNorm(24, eps=1e-6).to(dtype)
    with torch.no_grad():
        module.weight.copy_(weight - 1)
        want = module(x)
    got = rmsnorm_reference(x, weight - 1, 1e-6, style="gemma")
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("x", "weight", "eps", "style", "message"),
    [
        (torch.zeros(2, 8), torch.ones(8), 1e-6, "t5", "style must be 'llama' or 'gemma'"),
        (torch.zeros(2, 8), torch.ones(2, 4), 1e-6, "llama", "weight must be a 1-D floating tensor"),
        (torch.zeros(2, 9), torch.ones(8), 1e-6, "llama", r"x must be a floating \(\.\.\., 8\) tensor"),
        (torch.zeros(2, 8, dtype=torch.long), torch.ones(8), 1e-6, "llama", "x must be a floating"),
        (torch.zeros(2, 8), torch.ones(8), float("nan"), "llama", "eps must be a finite number"),
        (torch.zeros(2, 8), torch.ones(8, device="meta"), 1e-6, "llama", "weight is on meta but x is on cpu"),
    ],
)
def test_invalid_inputs_say_what_to_fix(x, weight, eps, style, message):
    with pytest.raises(ValueError, match=message):
        rmsnorm_reference(x, weight, eps, style=style)


def test_styles_are_recognised_by_their_code():
    assert rmsnorm_style(LlamaRMSNorm(8)) == "llama"
    assert rmsnorm_style(Qwen2RMSNorm(8)) == "llama"
    assert rmsnorm_style(MistralRMSNorm(8)) == "llama"
    assert rmsnorm_style(GemmaRMSNorm(8)) == "gemma"
    # a variance_epsilon and a weight are not enough: the code must be Llama's
    assert rmsnorm_style(CastAfterWeightRMSNorm(8)) is None
    assert rmsnorm_style(nn.LayerNorm(8)) is None


def test_reference_path_replaces_nothing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_llama()
    assert fuse_rmsnorm(model, "reference") == 0
    assert fuse_rmsnorm(model, "auto") == 0  # auto on the CPU: the reference
    assert not any("forward" in m.__dict__ for m in model.modules())


@needs_triton
def test_triton_on_cpu_without_the_interpreter_says_how_to_fix(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"needs a CUDA device, got cpu\. Hint: .*TRITON_INTERPRET=1"):
        fuse_rmsnorm(tiny_llama(), "triton")
    with pytest.raises(ValueError, match="the Triton kernel needs CUDA tensors, got cpu"):
        rmsnorm_triton(*norm_inputs(2, 8, seed=3), 1e-6)


# Without a GPU, and unless TRITON_INTERPRET=1 was exported, the kernel_device tests run in a child pytest.
test_kernel_tests_in_the_triton_interpreter = rerun_in_the_interpreter


# --- the kernel against the reference (GPU, or Triton's interpreter in float32) --------------------------


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("hidden", [8, 100, 576, 896, 1000, 2048])
def test_kernel_matches_reference(kernel_device, rows, hidden):
    x, weight = (t.to(kernel_device) for t in norm_inputs(rows, hidden, seed=rows * 1000 + hidden))
    got = rmsnorm_triton(x, weight, 1e-5)
    want = rmsnorm_reference(x, weight, 1e-5)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_matches_the_llama_module(kernel_device):
    x, weight = (t.to(kernel_device) for t in norm_inputs(12, 576, seed=4))
    module = LlamaRMSNorm(576, eps=1e-5).to(kernel_device)
    with torch.no_grad():
        module.weight.copy_(weight)
        want = module(x.view(3, 4, 576))  # (3, 4, H)
    got = rmsnorm_triton(x.view(3, 4, 576), module.weight, module.variance_epsilon)
    assert got.shape == (3, 4, 576)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [24, 300])
def test_kernel_gemma_style_matches_reference(kernel_device, hidden):
    x, weight = (t.to(kernel_device) for t in norm_inputs(9, hidden, seed=5))
    got = rmsnorm_triton(x, weight - 1, 1e-6, style="gemma")
    torch.testing.assert_close(
        got, rmsnorm_reference(x, weight - 1, 1e-6, style="gemma"), rtol=1e-5, atol=1e-5
    )


def test_kernel_reads_strided_rows_and_copies_other_layouts(kernel_device):
    x, weight = (t.to(kernel_device) for t in norm_inputs(30, 64, seed=6))
    rows = x.view(10, 3, 64)[:, 1]  # (10, H), row stride 3 * H
    assert not rows.is_contiguous()
    torch.testing.assert_close(rmsnorm_triton(rows, weight, 1e-6), rmsnorm_reference(rows, weight, 1e-6))
    columns = x[:, :64].T.contiguous().T  # (30, H) column-major: unit stride on the rows
    torch.testing.assert_close(
        rmsnorm_triton(columns, weight, 1e-6), rmsnorm_reference(columns, weight, 1e-6)
    )


def test_kernel_on_no_rows_and_a_wide_row(kernel_device):
    x, weight = (t.to(kernel_device) for t in norm_inputs(0, 32, seed=7))
    assert rmsnorm_triton(x.view(0, 1, 32), weight, 1e-6).shape == (0, 1, 32)
    x, weight = (t.to(kernel_device) for t in norm_inputs(2, 5000, seed=8))
    torch.testing.assert_close(rmsnorm_triton(x, weight, 1e-6), rmsnorm_reference(x, weight, 1e-6))


def test_rows_wider_than_the_kernel_are_refused():
    x, weight = norm_inputs(1, MAX_HIDDEN + 1, seed=9)
    with pytest.raises(ValueError, match=f"at most {MAX_HIDDEN} values.*kernels='reference'"):
        rmsnorm_triton(x, weight, 1e-6)


# --- fuse_rmsnorm on whole models ------------------------------------------------------------------------


def test_fused_llama_gives_the_same_logits(kernel_device, caplog: pytest.LogCaptureFixture):
    model = tiny_llama().to(kernel_device)
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(0)).to(kernel_device)
    before = logits(model, ids)
    with caplog.at_level(logging.INFO, logger="rmserve_kernels.rmsnorm"):
        assert fuse_rmsnorm(model, "triton") == 2 * 2 + 1  # two per layer and the final norm
    assert "fused 5 RMSNorm modules" in caplog.text and "LlamaRMSNorm (llama) x5" in caplog.text
    after = logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert fuse_rmsnorm(model, "triton") == 0  # already fused: a second call replaces nothing
    norm = model.model.norm
    assert norm.forward.__func__ is not LlamaRMSNorm.forward
    with torch.no_grad():
        norm.weight.mul_(2)
    # the weight is read at each call: doubling the final norm's doubles the (bias-free) score
    torch.testing.assert_close(logits(model, ids), 2 * before, rtol=1e-5, atol=1e-5)


def test_fused_gemma_gives_the_same_logits(kernel_device):
    model = tiny_gemma().to(kernel_device)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1)).to(kernel_device)
    before = logits(model, ids)
    assert fuse_rmsnorm(model, "triton") == 5
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


def test_unknown_rmsnorm_forms_are_left_alone_and_named(kernel_device, caplog: pytest.LogCaptureFixture):
    model = tiny_llama().to(kernel_device)
    model.model.norm = CastAfterWeightRMSNorm(48, eps=1e-5).to(kernel_device)
    with caplog.at_level(logging.INFO, logger="rmserve_kernels.rmsnorm"):
        assert fuse_rmsnorm(model, "triton") == 4
    assert "left on their own forward" in caplog.text and "CastAfterWeightRMSNorm x1" in caplog.text
    assert "forward" not in model.model.norm.__dict__


def test_unsupported_weights_are_refused_before_anything_is_replaced(kernel_device):
    model = tiny_llama().to(kernel_device)
    model.model.layers[1].post_attention_layernorm.weight = nn.Parameter(
        torch.ones(4, 12, device=kernel_device)
    )
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.post_attention_layernorm .* 1-D .*kernels='reference'"
    ):
        fuse_rmsnorm(model, "triton")
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fused_forward_refuses_to_record_gradients(kernel_device):
    model = tiny_llama().to(kernel_device)
    fuse_rmsnorm(model, "triton")
    x = torch.randn(2, 48, device=kernel_device)
    with pytest.raises(RuntimeError, match=r"forward only.*inference_mode.*kernels='reference'"):
        model.model.norm(x)
    with torch.no_grad():
        assert model.model.norm(x).shape == (2, 48)


@pytest.mark.parametrize("kind", ["dense", "brme"])
def test_backends_fuse_their_norms_at_load(kernel_device, tmp_path: Path, kind: str):
    from rmserve.config import LoadOptions
    from rmserve.models.base import reward_values
    from rmserve.models.dense import DenseRewardModel
    from rmserve.models.heads import MultiHeadRewardModel
    from rmserve.models.inputs import PromptResponse, Text
    from tests.tiny_models import BUILDERS, build_head_model

    path = BUILDERS["llama"](tmp_path / "llama")
    backend: type = DenseRewardModel
    if kind == "brme":
        path, backend = build_head_model(tmp_path / "brme", path, "brme"), MultiHeadRewardModel
    device = str(kernel_device)
    reference = backend("r", path, LoadOptions(dtype="float32", device=device, kernels="reference"))
    fused = backend("t", path, LoadOptions(dtype="float32", device=device, kernels="triton"))
    base = fused.base if kind == "dense" else fused.backbone.base
    assert sum(_fused(m) for m in base.modules()) == 5
    assert not any(
        _fused(m) for m in (reference.model if kind == "dense" else reference.backbone.base).modules()
    )
    inputs = [
        PromptResponse(prompt="How do I bake bread?", response="Mix and bake."),
        Text(text="a longer text " * 9),
    ]
    encoded = reference.new_encoder().encode_many(inputs)
    assert reward_values(fused, encoded) == pytest.approx(reward_values(reference, encoded), abs=1e-5)


def _fused(module: nn.Module) -> bool:
    return "forward" in module.__dict__
