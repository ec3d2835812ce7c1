"""Loading for serving (``rmserve.scoring.loading.load_models``): each model is warmed up before it takes requests."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rmserve.config import ModelSpec, Settings
from rmserve.models.base import ForwardError
from rmserve.models.inputs import Text
from rmserve.scoring import loading
from rmserve.scoring.loading import WARM_UP_TEXT, load_models


def test_each_model_is_warmed_up_once_before_it_is_returned(tiny_model_dirs, monkeypatch, caplog):
    warmed: list[tuple[str, list[int]]] = []
    original = loading.warm_up

    def spy(model, *, autocast):
        assert autocast is False
        real_score = model.score

        def score(encoded, **lambdas):
            warmed.append((model.info.name, list(encoded[0].token_ids)))
            return real_score(encoded, **lambdas)

        model.score = score  # the warm-up's forward, recorded
        original(model, autocast=autocast)
        del model.score

    monkeypatch.setattr(loading, "warm_up", spy)
    specs = [
        ModelSpec(name="a", path=str(tiny_model_dirs["llama"])),
        ModelSpec(name="b", path=str(tiny_model_dirs["bert"])),
    ]
    with caplog.at_level(logging.INFO, logger="rmserve.scoring.loading"):
        models, _ = load_models(Settings(models=specs, device="cpu"))
    text = [Text(text=WARM_UP_TEXT)]
    assert warmed == [(m.info.name, list(m.new_encoder().encode_many(text)[0].token_ids)) for m in models]
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" up in ")[0] for m in messages if m.startswith("warmed")] == ["warmed 'a'", "warmed 'b'"]


def test_a_checkpoint_giving_non_finite_rewards_fails_loading(tiny_model_dirs, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["llama"], broken)
    weights = load_file(broken / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ForwardError, match="'broken' gives a non-finite reward for a short text at load"):
        load_models(Settings(models=[ModelSpec(name="broken", path=str(broken))], device="cpu"))
