"""Settings: defaults, env vars, YAML config, precedence and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from rmserve.config import ModelSpec, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("RMSERVE_PORT", "RMSERVE_MODEL", "RMSERVE_CONFIG", "RMSERVE_MAX_BATCH_TOKENS"):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rmserve.yaml"
    path.write_text(text)
    return path


def test_defaults():
    s = Settings()
    assert (s.host, s.port, s.dtype, s.device, s.truncation) == ("127.0.0.1", 8000, "auto", "auto", "left")
    assert s.served_models() == [ModelSpec(name="demo", path="demo")]


def test_a_model_path_is_named_after_its_folder():
    assert Settings(model="/models/my-rm").served_models() == [ModelSpec(name="my-rm", path="/models/my-rm")]


def test_precedence_flag_over_env_over_yaml(tmp_path, monkeypatch):
    config = write(tmp_path, "port: 7000\nmax_batch_tokens: 1234\nmax_batch_size: 3\n")
    assert Settings(config=config).port == 7000
    monkeypatch.setenv("RMSERVE_PORT", "7100")
    s = Settings(config=config)
    assert (s.port, s.max_batch_tokens, s.max_batch_size) == (7100, 1234, 3)
    assert Settings(config=config, port=7200).port == 7200


def test_config_file_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RMSERVE_CONFIG", str(write(tmp_path, "max_batch_size: 5\n")))
    assert Settings().max_batch_size == 5


def test_yaml_models_in_order(tmp_path):
    config = write(
        tmp_path, "models:\n  - {name: b, path: /m/b, dtype: bfloat16}\n  - {name: a, path: demo}\n"
    )
    assert Settings(config=config).served_models() == [
        ModelSpec(name="b", path="/m/b", dtype="bfloat16"),
        ModelSpec(name="a", path="demo"),
    ]


def test_model_flag_and_config_models_conflict(tmp_path):
    config = write(tmp_path, "models:\n  - {name: a, path: demo}\n")
    with pytest.raises(ValidationError, match="both --model and a config 'models' list"):
        Settings(config=config, model="/x")


def test_duplicate_model_names(tmp_path):
    config = write(tmp_path, "models:\n  - {name: a, path: demo}\n  - {name: a, path: /x}\n")
    with pytest.raises(ValidationError, match="repeated: a"):
        Settings(config=config)


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist; check --config"):
        Settings(config=tmp_path / "missing.yaml")


def test_unknown_keys_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings(batch_tokens=5)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings(config=write(tmp_path, "max_batch_tokenz: 5\n"))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings(config=write(tmp_path, "models:\n  - {name: a, path: demo, dtyp: float32}\n"))


def test_bad_values_are_refused():
    with pytest.raises(ValidationError, match="dtype"):
        Settings(dtype="float16")
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings(max_batch_size=0)


def test_yaml_must_be_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="must hold a mapping"):
        Settings(config=write(tmp_path, "- a\n- b\n"))
