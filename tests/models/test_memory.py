"""Memory planning: budget sizes, weight estimates equal to the loaded models' ``module_bytes``, the
activation formula against a measured peak, and the budget check (largest activation per device,
devices budgeted apart)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForSequenceClassification

from rmserve.config import LoadOptions, ModelSpec, Settings, parse_memory_size
from rmserve.memory import (
    ForwardShape,
    MemoryBudgetError,
    ModelEstimate,
    Transformer,
    activation_bytes,
    available_ram,
    device_budget,
    device_key,
    estimate_model,
    plan_memory,
    plan_served_models,
)
from rmserve.models.ensemble import Calibration, EnsembleConfig, Member, write_ensemble_config
from rmserve.models.loader import load_model
from rmserve.scoring import loading
from rmserve.scoring.loading import load_models
from rmserve.scoring.registry import ModelRegistry
from rmserve.training.upcycle import upcycle
from tests.tiny_models import bpe_tokenizer

GiB = 2**30


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1024", 1024),
        ("70GiB", 70 * GiB),
        ("70gib", 70 * GiB),
        ("512 MB", 512_000_000),
        (" 8 GB ", 8_000_000_000),
        ("1.5GiB", int(1.5 * GiB)),
        ("2KiB", 2048),
        ("3kb", 3000),
        ("64MiB", 64 * 2**20),
        ("100b", 100),
    ],
)
def test_parse_memory_size(text: str, size: int) -> None:
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "10 XB", "0", "0GiB", "-1GiB", "1.5", "GiB", "1e9"])
def test_parse_memory_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match=r"memory size|whole number|more than 0"):
        parse_memory_size(text)


def test_settings_check_the_budget_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="--memory-budget"):
        Settings(memory_budget="lots")
    assert Settings(memory_budget=75_000_000_000).memory_budget == "75000000000"  # a YAML number
    monkeypatch.setenv("RMSERVE_MEMORY_BUDGET", "12GiB")
    assert Settings().memory_budget == "12GiB"


def test_forward_shape_is_the_largest_batch_the_limits_allow() -> None:
    assert ForwardShape.of(max_batch_tokens=8192, max_batch_size=64, length=2048) == ForwardShape(8192, 2048)
    assert ForwardShape.of(max_batch_tokens=8192, max_batch_size=2, length=512) == ForwardShape(1024, 512)
    assert ForwardShape.of(max_batch_tokens=1000, max_batch_size=64, length=4096) == ForwardShape(1000, 1000)


# --- weights: the estimate is the loaded model's module_bytes ---------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(
    tiny_model_dirs: dict[str, Path], tiny_head_model_dirs: dict[str, Path], tmp_path_factory
) -> dict[str, Path]:
    """Every kind: the tiny dense models, multihead, brme, a two-member ensemble and an upcycled moe."""
    root = tmp_path_factory.mktemp("memory-models")
    calibration = Calibration(mean=0.0, std=1.0)
    ensemble = write_ensemble_config(
        root / "ensemble",
        EnsembleConfig(
            members=(
                Member(name="a", path=str(tiny_model_dirs["llama"]), calibration=calibration),
                Member(name="b", path=str(tiny_model_dirs["bert"]), calibration=calibration),
            )
        ),
    )
    upcycle(tiny_model_dirs["llama"], root / "moe", experts=3, top_k=2, last=1)
    return {**tiny_model_dirs, **tiny_head_model_dirs, "ensemble": ensemble, "moe": root / "moe"}


KINDS = ["llama", "qwen2", "gpt_neox", "bert", "multihead", "brme", "ensemble", "moe"]


def _estimate(path: Path, **options) -> ModelEstimate:
    return estimate_model(
        "m", path, LoadOptions(device="cpu", **options), max_batch_tokens=256, max_batch_size=8
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_weights_estimate_is_the_loaded_module_bytes(
    model_dirs: dict[str, Path], kind: str, dtype: str
) -> None:
    loaded = load_model("m", model_dirs[kind], LoadOptions(dtype=dtype, device="cpu"))  # type: ignore[arg-type]
    assert _estimate(model_dirs[kind], dtype=dtype).weights_bytes == loaded.info.weights_bytes


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_sharing_adds_its_caches_only_where_the_model_shares(
    model_dirs: dict[str, Path], kind: str
) -> None:
    loaded = load_model("m", model_dirs[kind], LoadOptions(dtype="float32", device="cpu"))
    plain = _estimate(model_dirs[kind], dtype="float32")
    shared = estimate_model(
        "m", model_dirs[kind], LoadOptions(device="cpu", dtype="float32"), max_batch_tokens=256, max_batch_size=8,
        prefix_sharing=True,
    )  # fmt: skip
    assert (shared.activation_bytes > plain.activation_bytes) is loaded.info.shares_prefixes
    assert shared.weights_bytes == plain.weights_bytes


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
@pytest.mark.parametrize("kind", ["llama", "bert", "brme", "moe"])
def test_quantized_weights_estimate_is_the_loaded_module_bytes(
    model_dirs: dict[str, Path], kind: str, quantize: str
) -> None:
    """Exact (bound 0): the estimate replaces the layers the loader replaces, statistics included."""
    pytest.importorskip("bitsandbytes")
    loaded = load_model("m", model_dirs[kind], LoadOptions(dtype="float32", device="cpu", quantize=quantize))  # type: ignore[arg-type]
    estimate = _estimate(model_dirs[kind], dtype="float32", quantize=quantize)
    assert estimate.weights_bytes == loaded.info.weights_bytes
    assert estimate.weights_bytes < _estimate(model_dirs[kind], dtype="float32").weights_bytes


def test_a_config_that_does_not_describe_the_weights_is_an_error(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "wrong"
    folder.mkdir()
    for file in tiny_model_dirs["llama"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(ValueError, match="does not describe its weights"):
        _estimate(folder)


# --- activations: the formula against a measured peak -------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from rmserve.config import LoadOptions
    from rmserve.models.base import lambdas_for
    from rmserve.models.dense import DenseRewardModel
    from rmserve.models.inputs import EncodedInput

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    from rmserve.batching.planning import BatchLimits
    from rmserve.batching.prefix import plan_prefixes

    path, batch, length, attention = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    prefix = int(sys.argv[5]) if len(sys.argv) > 5 else 0  # > 0: every row starts with the same prefix
    packed = len(sys.argv) > 6 and sys.argv[6] == "packed"  # ragged inputs, one packed row of them all
    torch.set_num_threads(1)
    model = DenseRewardModel("m", path, LoadOptions(dtype="float32", device="cpu"))
    if packed:
        from rmserve.models.packing import Packing

        model.packing = Packing(max_tokens=batch * length, pair_cost=0.0)
    model.model.set_attn_implementation(attention)
    g = torch.Generator().manual_seed(0)
    def inputs(b, t):
        return [EncodedInput(tuple(torch.randint(5, 300, (t,), generator=g).tolist()), None, False) for _ in range(b)]
    with torch.inference_mode():  # warm-up: threads and kernels initialised before measuring
        model.score(inputs(2, 8), **lambdas_for(model.info.defaults, 2))
    items = inputs(batch, length)
    if packed:  # lengths 1/4 to 7/4 of length: the same tokens, ragged
        items = [EncodedInput(x.token_ids[: length // 4 + (i % 4) * length // 4], None, False) for i, x in enumerate(items)]
        items += inputs(1, batch * length - sum(len(x) for x in items))
        assert model.packing.rows([len(x) for x in items]) == [list(range(len(items)))]
    plan = None
    if prefix:
        shared = items[0].token_ids[:prefix]
        items = [EncodedInput(shared + x.token_ids[prefix:], None, False) for x in items]
        plan = plan_prefixes([x.token_ids for x in items], 1, BatchLimits(batch * length, batch))
        assert len(plan.groups) == 1 and plan.groups[0].prefix >= prefix
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    with torch.inference_mode():
        model.score(items, **lambdas_for(model.info.defaults, len(items)), plan=plan)
    print(json.dumps({"peak": status("VmHWM") - before}))
    """
)


def measured_peak(
    path: Path, batch: int, length: int, attention: str, prefix: int = 0, packed: bool = False
) -> int:
    """The RSS increase of one forward in a fresh process, freed blocks returned to the OS at once; with
    ``prefix``, every row shares its first ``prefix`` tokens, computed once; ``packed``: ragged inputs of
    ``batch x length`` tokens in all, run as one packed row."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    args = [str(path), str(batch), str(length), attention, str(prefix), "packed" if packed else "padded"]
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *args],
        capture_output=True, text=True, env=env, check=True, timeout=300,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


MEASURES_RSS = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="measures the peak RSS through Linux /proc"
)


def meta_arch(path: Path) -> Transformer:
    """The planner's figures for a Llama folder, read off its meta twin (decoders run unmasked)."""
    with torch.device("meta"):
        meta = LlamaForSequenceClassification(LlamaConfig.from_pretrained(path))
    return Transformer.of(meta, masked=False)


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> Path:
    """A random Llama wide enough for its activations to dwarf the process' noise (GQA: 8 heads, 4 kv)."""
    torch.manual_seed(0)
    tokenizer = bpe_tokenizer(chat=True, bos=False)
    config = LlamaConfig(
        vocab_size=384, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=4096, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("small-llama")
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@MEASURES_RSS
@pytest.mark.parametrize(("attention", "batch", "length"), [("sdpa", 16, 512), ("eager", 4, 1024)])
def test_activation_formula_bounds_the_measured_peak(
    small_llama: Path, attention: str, batch: int, length: int
) -> None:
    """Above the measured peak and within 20% of it."""
    arch = dataclasses.replace(meta_arch(small_llama), attention=attention)
    shape = ForwardShape.of(max_batch_tokens=batch * length, max_batch_size=batch, length=length)
    formula = activation_bytes(arch, shape, torch.float32)
    peak = measured_peak(small_llama, batch, length, attention)
    assert peak <= formula <= 1.2 * peak, (
        f"formula {formula / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB"
    )


@MEASURES_RSS
def test_the_prefix_sharing_term_bounds_the_measured_peak(small_llama: Path) -> None:
    """16 rows of 512 tokens sharing 384: the suffix forward attends over 512 per row, as the planner counts."""
    arch = meta_arch(small_llama)
    shape = ForwardShape.of(max_batch_tokens=16 * 512, max_batch_size=16, length=512)
    formula = activation_bytes(arch, shape, torch.float32, prefix_cache_layers=2)
    peak = measured_peak(small_llama, 16, 512, "sdpa", prefix=384)
    assert peak <= formula, f"formula {formula / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB"
    assert formula <= 1.5 * activation_bytes(arch, shape, torch.float32)


@MEASURES_RSS
def test_the_packing_term_bounds_the_measured_peak(small_llama: Path) -> None:
    """Ragged inputs of 2048 tokens in all, packed into one row: its block mask is what packing adds."""
    arch = meta_arch(small_llama)
    shape = ForwardShape.of(max_batch_tokens=2048, max_batch_size=32, length=64)
    formula = activation_bytes(arch, shape, torch.float32, packed_tokens=2048)
    peak = measured_peak(small_llama, 32, 64, "sdpa", packed=True)
    assert peak <= formula, f"formula {formula / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB"
    assert activation_bytes(arch, shape, torch.float32) < peak, "the mask must matter for the test to bite"


def test_the_planner_sees_the_attention_the_backends_get(small_llama: Path) -> None:
    loaded = load_model("m", small_llama, LoadOptions(dtype="float32", device="cpu"))
    assert meta_arch(small_llama).attention == loaded.model.config._attn_implementation == "sdpa"


# --- the check ------------------------------------------------------------------------------------------


def estimate(name: str, device: str, weights: int, activations: int) -> ModelEstimate:
    return ModelEstimate(name, device, weights, activations, detail="test")


def test_activations_count_once_per_device_weights_add_up() -> None:
    """Forwards on a device run one at a time: weights 100 + 200 and the larger peak 80 need 380."""
    models = [estimate("a", "cpu", 100, 50), estimate("b", "cpu", 200, 80)]
    plan = plan_memory(models, {"cpu": 380})
    assert plan.devices[0].total_bytes == 380
    assert plan.devices[0].peak_model.name == "b"
    plan.check()
    with pytest.raises(MemoryBudgetError):
        plan_memory(models, {"cpu": 379}).check()


def test_each_device_has_its_own_budget() -> None:
    models = [estimate("on-cpu", "cpu", 100, 50), estimate("on-gpu", "cuda:1", 200, 80)]
    plan_memory(models, {"cpu": 150, "cuda:1": 280}).check()
    with pytest.raises(MemoryBudgetError) as refused:
        plan_memory(models, {"cpu": 150, "cuda:1": 279}).check()
    message = str(refused.value)
    assert "the models on cuda:1 do not fit" in message and "on-gpu" in message
    assert "on cpu" not in message


def test_an_over_budget_config_is_refused_with_every_estimate(model_dirs: dict[str, Path]) -> None:
    specs = [
        ModelSpec(name="rm", path=str(model_dirs["llama"])),
        ModelSpec(name="heads", path=str(model_dirs["brme"])),
    ]
    settings = Settings(models=specs, memory_budget="1MB", device="cpu")
    plan = plan_served_models(settings, specs, [Path(s.path) for s in specs])
    with pytest.raises(MemoryBudgetError) as refused:
        plan.check()
    message = str(refused.value)
    for expected in ("rm on cpu: weights", "heads on cpu: weights", "activations", "976.56 KiB budget",
                     "max_batch_tokens", "--quantize", "another device", "--memory-budget"):  # fmt: skip
        assert expected in message, message


def test_per_model_limits_size_its_activations(model_dirs: dict[str, Path]) -> None:
    specs = [
        ModelSpec(name="small", path=str(model_dirs["llama"]), max_batch_tokens=128),
        ModelSpec(name="large", path=str(model_dirs["llama"]), max_batch_tokens=1024),
    ]
    plan = plan_served_models(Settings(models=specs, device="cpu"), specs, [Path(s.path) for s in specs])
    small, large = plan.estimate("small"), plan.estimate("large")
    assert small.weights_bytes == large.weights_bytes
    assert small.activation_bytes < large.activation_bytes


def test_budgets_default_to_the_device() -> None:
    assert device_budget("cpu", "2GiB") == device_budget("cuda:1", "2GiB") == 2 * GiB  # no hardware touched
    assert 0 < device_budget("cpu") <= available_ram() + GiB
    assert device_key("cpu") == "cpu" and device_key("cuda:1") == "cuda:1"


def test_load_models_refuses_before_loading_anything(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded although the plan is over budget")

    monkeypatch.setattr(loading, "load_model", no_loading)
    specs = [ModelSpec(name="rm", path=str(model_dirs["llama"]))]
    with pytest.raises(MemoryBudgetError, match="rm on cpu"):
        load_models(Settings(models=specs, memory_budget="1KB", device="cpu"))


def test_models_on_one_device_share_its_forward_thread(model_dirs: dict[str, Path]) -> None:
    """What the planner assumes: one forward thread per device, so one activation peak at a time."""
    specs = [
        ModelSpec(name="a", path=str(model_dirs["llama"])),
        ModelSpec(name="b", path=str(model_dirs["brme"])),
    ]
    settings = Settings(models=specs, device="cpu", max_batch_tokens=256)
    models, specs = load_models(settings)
    assert [m.info.memory_estimate_bytes for m in models] == [
        plan_served_models(settings, specs, [Path(s.path) for s in specs]).estimate(n).total_bytes
        for n in "ab"
    ]
    registry = ModelRegistry.from_models(models, settings, specs=specs)
    try:
        assert list(registry._device_executors) == ["cpu"]
    finally:
        for executor in registry._device_executors.values():
            executor.shutdown(wait=False)
