"""``--quantize int8|nf4``: every backend loads through bitsandbytes on CPU, heads stay float, scores stay close.

Two kinds of checks on the tiny random models of ``tests.tiny_models``:

- Exact: an int8 or nf4 model computes what the float model computes with each quantised weight replaced
  by its round trip (int8: bitsandbytes' per-row absmax quantisation and its dequantisation; nf4:
  ``quantize_4bit`` then ``dequantize_4bit``) and every other weight untouched, to float32 rounding.
  This pins down which layers are quantised, how, and in which dtype.
- Close: every head's reward against the unquantised model's, relative to that head's spread (std) over
  the inputs. These models are a worst case: 32-wide layers average no noise away and the heads are
  rescaled to rewards of std about 5. Measured on the 32 pairs below with the decoders (dense Llama,
  multihead, brme, the Llama/Qwen2 ensemble, MoE), int8 (weights only; activations stay float32) moves a
  reward by at most 4.6% of its head's spread (2.1% on average) and keeps the preferred response of
  every pair; nf4 (16 levels per block of 64 weights) moves it by up to 69% (27% on average) and keeps
  at least 90.6%. The bounds below leave a margin over those figures (a flip is 3.1% of the pairs); the
  demo model's figures, which the >= 99% / >= 97% agreement targets are about, come from
  ``bench/quantize.py``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.models.base import lambdas_for, module_bytes, parameter_count
from rmserve.models.dense import DenseRewardModel
from rmserve.models.ensemble import (
    Calibration,
    EnsembleConfig,
    EnsembleRewardModel,
    Member,
    write_ensemble_config,
)
from rmserve.models.heads import MultiHeadRewardModel
from rmserve.models.inputs import PromptResponse
from rmserve.models.loader import load_model
from rmserve.models.moe import MoERewardModel, moe_layers
from rmserve.models.quantize import INSTALL_COMMAND, bnb_config, int8_weight_forward, quantize_linears
from rmserve.scoring.loading import load_models
from rmserve.training.hh import load_pairs
from rmserve.training.upcycle import upcycle
from tests.tiny_models import DATA

PAIRS = 32
MAX_CHANGE = {"int8": 0.08, "nf4": 1.0}  # largest |reward change| / the head's reward std
MEAN_CHANGE = {"int8": 0.04, "nf4": 0.45}  # mean |reward change| / the head's reward std
AGREEMENT = {"int8": 0.96, "nf4": 0.85}  # share of pairs whose preferred response is unchanged, per head
BNB_LAYER = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}
MODES = ("int8", "nf4")


def pair_inputs(count: int = PAIRS) -> list[PromptResponse]:
    """chosen_0, rejected_0, chosen_1, ...: first user turn as prompt, last assistant turn as response."""
    inputs = []
    for pair in load_pairs(DATA)[:count]:
        for dialogue in (pair.chosen, pair.rejected):
            inputs.append(PromptResponse(prompt=dialogue[0]["content"], response=dialogue[-1]["content"]))
    return inputs


def head_rewards(model, inputs) -> torch.Tensor:
    """Every head's reward per input, (N, k) float64, scored in batches of 8 as the server would batch them."""
    encoded = model.new_encoder().encode_many(inputs, "left")
    batches = [encoded[i : i + 8] for i in range(0, len(encoded), 8)]
    return torch.cat(
        [model.score(b, **lambdas_for(model.info.defaults, len(b))).heads for b in batches]
    ).double()


def assert_close_rewards(quantised: torch.Tensor, reference: torch.Tensor, quantize: str) -> None:
    """Finite; each head's reward change within the bounds; the preferred response kept on most pairs."""
    assert torch.isfinite(quantised).all()
    change = (quantised - reference).abs() / reference.std(dim=0)  # (N, k), in units of each head's spread
    worst, mean = float(change.max()), float(change.mean(dim=0).max())
    assert worst <= MAX_CHANGE[quantize] and mean <= MEAN_CHANGE[quantize], (
        f"{quantize}: reward change up to {worst:.3f} of the spread, {mean:.3f} on average"
    )
    kept = ((quantised[0::2] > quantised[1::2]) == (reference[0::2] > reference[1::2])).double().mean(dim=0)
    assert float(kept.min()) >= AGREEMENT[quantize], f"{quantize}: preferred response kept on {kept.tolist()}"


def round_trip(model: nn.Module, keep: tuple[str, ...], quantize: str) -> int:
    """Replace each float linear weight (but those named in ``keep``) by its quantisation round trip, in place.

    int8: bitsandbytes' per-row absmax quantisation of the float16 weight (what ``Int8Params`` stores),
    dequantised as ``int8_weight_forward`` does. nf4: ``quantize_4bit`` then ``dequantize_4bit``.
    """
    from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_quant, quantize_4bit

    count = 0
    with torch.no_grad():
        for layer in float_linears(model, keep):
            weight = layer.weight.data  # (out, in)
            if quantize == "int8":
                rows, scales, _ = int8_vectorwise_quant(weight.to(torch.float16))
                layer.weight.data = rows.to(weight.dtype).mul_(scales.unsqueeze(1).mul(1.0 / 127.0))
            else:
                packed, state = quantize_4bit(
                    weight, blocksize=64, compress_statistics=False, quant_type="nf4"
                )
                layer.weight.data = dequantize_4bit(packed, state).to(weight.dtype)
            count += 1
    return count


def float_linears(model: nn.Module, keep: tuple[str, ...]) -> list[nn.Linear]:
    """The plain float ``nn.Linear`` layers of ``model`` whose own name is not in ``keep``."""
    return [m for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] not in keep]


def expected_bytes(linears: list[nn.Linear], quantize: str) -> int:
    """Bytes of ``linears``' weights once quantised (biases and everything else unchanged).

    int8: one byte per weight + a float32 scale per output row. nf4: half a byte per weight + a float32
    absmax per block of 64 + the 16-entry float32 code table of each layer.
    """
    total = 0
    for layer in linears:
        n = layer.weight.numel()
        if quantize == "int8":
            total += n + 4 * layer.out_features
        else:
            total += math.ceil(n / 2) + 4 * math.ceil(n / 64) + 4 * 16
    return total


@pytest.fixture(scope="module")
def inputs() -> list[PromptResponse]:
    return pair_inputs()


@pytest.fixture(scope="module")
def dense(tiny_model_dirs) -> dict[str, DenseRewardModel]:
    return {
        q: DenseRewardModel(
            f"llama-{q}", tiny_model_dirs["llama"], LoadOptions(dtype="float32", device="cpu", quantize=q)
        )
        for q in ("none", *MODES)
    }


@pytest.fixture(scope="module")
def moe_dir(tiny_model_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "moe"
    upcycle(tiny_model_dirs["llama"], out, experts=4, top_k=2, seed=3)
    return out


@pytest.fixture(scope="module")
def unquantised(tiny_head_model_dirs, inputs) -> dict[str, tuple[MultiHeadRewardModel, torch.Tensor]]:
    """The multihead and brme models unquantised, with their head rewards on ``inputs``."""
    models = {
        kind: MultiHeadRewardModel(
            kind, tiny_head_model_dirs[kind], LoadOptions(dtype="float32", device="cpu")
        )
        for kind in ("multihead", "brme")
    }
    return {kind: (model, head_rewards(model, inputs)) for kind, model in models.items()}


# --- dense decoders and encoders ---------------------------------------------------------------------


@pytest.mark.parametrize("quantize", MODES)
def test_dense_llama_scores_stay_close(dense, inputs, quantize):
    reference = head_rewards(dense["none"], inputs)
    assert_close_rewards(head_rewards(dense[quantize], inputs), reference, quantize)


@pytest.mark.parametrize("quantize", MODES)
def test_dense_linears_are_quantised_and_the_head_is_not(dense, quantize):
    model, reference = dense[quantize], dense["none"]
    layers = [m for m in model.model.modules() if isinstance(m, nn.Linear)]
    quantised = [m for m in layers if type(m).__name__ == BNB_LAYER[quantize]]
    assert len(quantised) == len(layers) - 1 == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert type(model.head) is nn.Linear and model.head.weight.dtype == torch.float32
    assert torch.equal(model.head.weight, reference.head.weight)
    assert model.info.quantize == quantize and reference.info.quantize == "none"
    assert model.info.parameters == reference.info.parameters == parameter_count(reference.model)


@pytest.mark.parametrize("quantize", MODES)
def test_weights_bytes_shrink_by_the_expected_factor(dense, inputs, quantize):
    model, reference = dense[quantize], dense["none"]
    linears = float_linears(reference.model, keep=("score",))
    fp32 = sum(4 * m.weight.numel() for m in linears)
    packed = expected_bytes(linears, quantize)
    assert model.info.weights_bytes == reference.info.weights_bytes - fp32 + packed
    # on the linear layers: 4 bytes per weight become 1 + 4/in (int8) or 1/2 + 4/64 + 64/n (nf4)
    assert fp32 / packed > (3.5 if quantize == "int8" else 6.5)
    head_rewards(model, inputs[:8])  # a forward changes no byte count
    assert module_bytes(model.model) == model.info.weights_bytes


@pytest.mark.parametrize("quantize", MODES)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_quantised_model_computes_the_float_model_on_round_tripped_weights(
    tiny_model_dirs, inputs, arch, quantize
):
    quantised = DenseRewardModel(
        "q", tiny_model_dirs[arch], LoadOptions(dtype="float32", device="cpu", quantize=quantize)
    )
    oracle = DenseRewardModel("o", tiny_model_dirs[arch], LoadOptions(dtype="float32", device="cpu"))
    head = "score" if arch == "llama" else "classifier"
    assert round_trip(oracle.model, (head,), quantize) == (2 * 7 if arch == "llama" else 2 * 6 + 1)
    expected = head_rewards(oracle, inputs)
    torch.testing.assert_close(
        head_rewards(quantised, inputs), expected, rtol=0, atol=1e-4 * float(expected.std())
    )


def test_int8_never_quantises_activations(dense, inputs, monkeypatch):
    """The int8 layers run ``int8_weight_forward``: bitsandbytes' LLM.int8() matmul is never called."""
    import bitsandbytes

    def refuse(*args, **kwargs):
        raise AssertionError("bitsandbytes.matmul (LLM.int8) was called")

    monkeypatch.setattr(bitsandbytes, "matmul", refuse)
    assert torch.isfinite(head_rewards(dense["int8"], inputs[:4])).all()
    for layer in dense["int8"].model.modules():
        if type(layer).__name__ == "Linear8bitLt":
            assert layer.forward.__func__ is int8_weight_forward


def test_encoder_models_quantise_with_their_classifier_kept(tiny_model_dirs, inputs):
    """BERT-like cross-encoders quantise too; the pooler is quantised, the classifier is not.

    Their closeness is not bounded here: this tiny BERT's weights are drawn 25x wider than usual
    (``initializer_range`` 0.5), which makes it far more sensitive than any real model; the nf4 semantics
    are checked exactly above.
    """
    reference = DenseRewardModel("bert", tiny_model_dirs["bert"], LoadOptions(dtype="float32", device="cpu"))
    for quantize in MODES:
        model = DenseRewardModel(
            "bert", tiny_model_dirs["bert"], LoadOptions(dtype="float32", device="cpu", quantize=quantize)
        )
        classifier = model.model.classifier
        assert type(classifier) is nn.Linear
        assert torch.equal(classifier.weight, reference.model.classifier.weight)
        assert type(model.model.bert.pooler.dense).__name__ == BNB_LAYER[quantize]
        assert model.info.weights_bytes < reference.info.weights_bytes
        assert torch.isfinite(head_rewards(model, inputs)).all()


# --- multi-head backbones, ensembles, MoE ----------------------------------------------------------


@pytest.mark.parametrize("quantize", MODES)
@pytest.mark.parametrize("kind", ["multihead", "brme"])
def test_head_models_quantise_the_backbone_only(tiny_head_model_dirs, unquantised, inputs, kind, quantize):
    reference, expected = unquantised[kind]
    model = load_model(
        "q", tiny_head_model_dirs[kind], LoadOptions(dtype="float32", device="cpu", quantize=quantize)
    )
    assert isinstance(model, MultiHeadRewardModel) and model.info.quantize == quantize
    assert all(torch.equal(model.weights[n], reference.weights[n]) for n in reference.weights)
    assert all(t.dtype == torch.float32 for t in model.weights.values())
    base = model.backbone.base
    assert sum(type(m).__name__ == BNB_LAYER[quantize] for m in base.modules()) == 2 * 7
    assert model.info.weights_bytes < reference.info.weights_bytes
    assert model.info.parameters == reference.info.parameters
    assert_close_rewards(head_rewards(model, inputs), expected, quantize)


def test_ensemble_members_are_quantised(tiny_model_dirs, tmp_path, inputs):
    members = tuple(
        Member(name=arch, path=str(tiny_model_dirs[arch]), calibration=Calibration(mean=0.1, std=2.0))
        for arch in ("llama", "qwen2")
    )
    folder = write_ensemble_config(tmp_path / "ensemble", EnsembleConfig(members=members))
    reference = EnsembleRewardModel("e", folder, LoadOptions(dtype="float32", device="cpu"))
    model = load_model("e", folder, LoadOptions(dtype="float32", device="cpu", quantize="int8"))
    assert isinstance(model, EnsembleRewardModel) and model.info.quantize == "int8"
    assert all(m.info.quantize == "int8" and type(m.head) is nn.Linear for m in model.members)
    assert model.info.weights_bytes == sum(m.info.weights_bytes for m in model.members)
    assert model.info.weights_bytes < reference.info.weights_bytes
    assert_close_rewards(head_rewards(model, inputs), head_rewards(reference, inputs), "int8")


@pytest.mark.parametrize("quantize", MODES)
def test_moe_experts_are_quantised_and_routers_kept(moe_dir, inputs, quantize):
    reference = MoERewardModel("m", moe_dir, LoadOptions(dtype="float32", device="cpu", kernels="reference"))
    model = load_model("m", moe_dir, LoadOptions(dtype="float32", device="cpu", quantize=quantize))
    assert isinstance(model, MoERewardModel) and model.info.quantize == quantize
    for layer in moe_layers(model.model):
        assert type(layer.router) is nn.Linear and layer.router.weight.dtype == torch.float32
        assert all(type(e.gate_proj).__name__ == BNB_LAYER[quantize] for e in [layer.shared, *layer.experts])
    assert type(model.head) is nn.Linear
    assert model.info.weights_bytes == module_bytes(model.model) < reference.info.weights_bytes
    expected = head_rewards(reference, inputs)
    assert_close_rewards(head_rewards(model, inputs), expected, quantize)
    # exactly the float MoE on round-tripped weights, routers and head untouched
    round_trip(reference.model, ("score", "router"), quantize)
    oracle = head_rewards(reference, inputs)
    torch.testing.assert_close(head_rewards(model, inputs), oracle, rtol=0, atol=1e-4 * float(oracle.std()))


def test_quantised_moe_refuses_the_triton_moe_kernels(moe_dir):
    with pytest.raises(ValueError, match="Triton MoE kernels read float expert weights"):
        MoERewardModel(
            "m", moe_dir, LoadOptions(dtype="float32", device="cpu", kernels="triton", quantize="int8")
        )


def test_quantize_linears_leaves_kept_modules_and_none_alone():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)).eval()
    assert quantize_linears(model, "none", dtype=torch.float32, device=torch.device("cpu"), keep=()) == 0
    count = quantize_linears(model, "nf4", dtype=torch.float32, device=torch.device("cpu"), keep=("2",))
    assert count == 1 and type(model[0]).__name__ == "Linear4bit" and type(model[2]) is nn.Linear
    assert not model[0].training  # a replaced layer keeps the mode of the layer it replaces


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the head kernel runs in Triton's interpreter (make test sets it)",
)
@pytest.mark.parametrize("quantize", MODES)
def test_triton_head_kernel_reads_the_float_head_of_a_quantised_model(
    tiny_model_dirs, tiny_head_model_dirs, inputs, quantize
):
    pytest.importorskip("triton")
    for path in (tiny_model_dirs["llama"], tiny_head_model_dirs["brme"]):
        models = {
            k: load_model(k, path, LoadOptions(dtype="float32", device="cpu", kernels=k, quantize=quantize))
            for k in ("triton", "reference")
        }
        expected = head_rewards(models["reference"], inputs[:8])
        torch.testing.assert_close(head_rewards(models["triton"], inputs[:8]), expected, rtol=0, atol=1e-4)


# --- errors --------------------------------------------------------------------------------------------


def test_missing_bitsandbytes_says_how_to_install_it(tiny_model_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ValueError, match="needs bitsandbytes, which is not installed") as info:
        DenseRewardModel(
            "q", tiny_model_dirs["llama"], LoadOptions(dtype="float32", device="cpu", quantize="nf4")
        )
    assert INSTALL_COMMAND in str(info.value)
    DenseRewardModel(
        "q", tiny_model_dirs["llama"], LoadOptions(dtype="float32", device="cpu")
    )  # none needs nothing


def test_unknown_mode_and_float16_compute_are_refused(tiny_model_dirs):
    with pytest.raises(ValueError, match="unknown quantize 'int4'; use one of none, int8, nf4"):
        DenseRewardModel(
            "q", tiny_model_dirs["llama"], LoadOptions(dtype="float32", device="cpu", quantize="int4")
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float16 runs about 100x slower"):
        bnb_config("nf4", dtype=torch.float16, device=torch.device("cpu"), keep=())


def test_nf4_computes_in_the_model_dtype():
    config = bnb_config("nf4", dtype=torch.float32, device=torch.device("cpu"), keep=("score",))
    assert config is not None and config.bnb_4bit_compute_dtype == torch.float32
    assert config.bnb_4bit_quant_type == "nf4" and config.llm_int8_skip_modules == ["score"]
    assert bnb_config("none", dtype=torch.float32, device=torch.device("cpu"), keep=()) is None


# --- configuration -----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("RMSERVE_"):
            monkeypatch.delenv(name)


def test_model_spec_overrides_the_server_wide_quantize(tiny_model_dirs, clean_env):
    path = str(tiny_model_dirs["llama"])
    settings = Settings(
        quantize="int8",
        device="cpu",
        models=(
            ModelSpec(name="server-wide", path=path),
            ModelSpec(name="nf4", path=path, quantize="nf4"),
            ModelSpec(name="plain", path=path, quantize="none"),
        ),
    )
    models, _ = load_models(settings)
    assert [m.info.quantize for m in models] == ["int8", "nf4", "none"]
    assert models[1].info.weights_bytes < models[0].info.weights_bytes < models[2].info.weights_bytes


def test_yaml_config_and_env_set_quantize(tiny_model_dirs, tmp_path, clean_env, monkeypatch):
    config = tmp_path / "rmserve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "quantize": "nf4",
                "device": "cpu",
                "models": [
                    {"name": "a", "path": str(tiny_model_dirs["llama"])},
                    {"name": "b", "path": str(tiny_model_dirs["qwen2"]), "quantize": "int8"},
                ],
            }
        )
    )
    models, _ = load_models(Settings(config=config))
    assert [m.info.quantize for m in models] == ["nf4", "int8"]
    monkeypatch.setenv("RMSERVE_QUANTIZE", "int8")
    assert Settings(config=config).quantize == "int8"  # the environment outranks the file
