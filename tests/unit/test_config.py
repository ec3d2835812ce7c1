"""Settings: defaults, env vars, YAML config, precedence and errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from rmserve.config import LoadOptions, ModelSpec, Settings

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RMSERVE_* variable of the machine running the tests leaks in (names are case-insensitive)."""
    for name in list(os.environ):
        if name.upper().startswith("RMSERVE_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "rmserve.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults -------------------------------------------------------------------------------------


def test_defaults():
    s = Settings()
    assert s.model_dump() == {
        "model": None,
        "config": None,
        "host": "127.0.0.1",
        "port": 8000,
        "dtype": "auto",
        "device": "auto",
        "quantize": "none",
        "memory_budget": None,
        "pooling": None,
        "kernels": "auto",
        "max_length": None,
        "truncation": "left",
        "max_batch_tokens": 8192,
        "max_batch_size": 64,
        "max_join_padding": None,
        "max_packed_tokens": None,
        "prefix_min_tokens": 32,
        "duplicate_cache_entries": 8192,
        "autocast": False,
        "compile": False,
        "cpu_row_threads": 1,
        "max_wait_ms": 2.0,
        "max_queue_tokens": 1_048_576,
        "max_inputs_per_request": 4096,
        "max_request_bytes": 32 * 1024 * 1024,
        "request_timeout_s": 600.0,
        "shutdown_timeout_s": 60.0,
        "monitor_window": 256,
        "monitor_max_runs": 64,
        "monitor_max_windows": 512,
        "monitor_baseline_windows": 3,
        "cache_dir": Path.home() / ".cache" / "rmserve",
        "log_level": "info",
        "log_format": "text",
        "api_key": None,
        "models": (),
    }


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(ValidationError, match="Instance is frozen"):
        s.port = 9000  # type: ignore[misc]


# --- served_models --------------------------------------------------------------------------------


def test_no_model_serves_the_demos_built_from_shipped_files():
    # demo-moe and demo-merged take a training run: served only when named, once built
    assert Settings().served_models() == [
        ModelSpec(name="demo", path="demo"),
        ModelSpec(name="demo-brme", path="demo-brme"),
        ModelSpec(name="demo-ensemble", path="demo-ensemble"),
    ]
    assert Settings(model="demo").served_models() == [ModelSpec(name="demo", path="demo")]
    assert Settings(model="demo-moe").served_models() == [ModelSpec(name="demo-moe", path="demo-moe")]
    assert Settings(model="demo-brme").served_models() == [ModelSpec(name="demo-brme", path="demo-brme")]


def test_model_spec_aggregation_overrides_are_validated():
    spec = ModelSpec(name="m", path="/m", reward="min", uwo_lambda=0.5, tradeoff_lambda=1.0)
    assert (spec.kind, spec.reward, spec.uwo_lambda, spec.tradeoff_lambda) == ("auto", "min", 0.5, 1.0)
    for bad in ({"reward": "median"}, {"uwo_lambda": -1}, {"tradeoff_lambda": 1.5}, {"kind": "mixture"}):
        with pytest.raises(ValidationError):
            ModelSpec(name="m", path="/m", **bad)


def test_load_options_take_the_spec_value_else_the_server_wide_one():
    settings = Settings(
        dtype="bfloat16", device="cpu", quantize="int8", max_length=512, kernels="reference", pooling="hf",
        max_packed_tokens=1024,
    )  # fmt: skip
    own = ModelSpec(
        name="a", path="a", kind="brme", dtype="float32", device="cuda:1", quantize="nf4", max_length=64,
        pooling="last", max_packed_tokens=0,
    )  # fmt: skip
    assert settings.load_options(own) == LoadOptions(
        kind="brme", dtype="float32", device="cuda:1", max_length=64, kernels="reference", quantize="nf4",
        pooling="last", max_packed_tokens=0,
    )  # fmt: skip
    assert settings.load_options(ModelSpec(name="b", path="b")) == LoadOptions(
        kind="auto", dtype="bfloat16", device="cpu", max_length=512, kernels="reference", quantize="int8",
        pooling="hf", max_packed_tokens=1024,
    )  # fmt: skip
    # unset everywhere: None, so each model folder's own rmserve.json declaration (else hf) decides
    assert Settings().load_options(ModelSpec(name="c", path="c")).pooling is None
    # packing unset everywhere: None, so the backend decides by device
    assert Settings().load_options(ModelSpec(name="c", path="c")).max_packed_tokens is None


def test_pooling_is_a_flag_an_env_var_and_a_yaml_field(monkeypatch, tmp_path):
    monkeypatch.setenv("RMSERVE_POOLING", "last")
    assert Settings().pooling == "last"
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - {name: a, path: /a, pooling: last}\n  - {name: b, path: /b}\n")
    monkeypatch.delenv("RMSERVE_POOLING")
    specs = Settings(config=config).served_models()
    assert [s.pooling for s in specs] == ["last", None]
    with pytest.raises(ValidationError, match="pooling"):
        ModelSpec(name="m", path="/m", pooling="mean")


def test_a_model_path_is_named_after_its_folder():
    assert Settings(model="/models/my-rm").served_models() == [ModelSpec(name="my-rm", path="/models/my-rm")]
    assert Settings(model="/models/my-rm/").served_models() == [
        ModelSpec(name="my-rm", path="/models/my-rm/")
    ]
    assert Settings(model="rms/v2.1").served_models() == [ModelSpec(name="v2.1", path="rms/v2.1")]


def test_the_current_folder_is_named_after_itself(tmp_path, monkeypatch):
    folder = tmp_path / "my-rm"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert Settings(model=".").served_models() == [ModelSpec(name="my-rm", path=".")]


# --- sources and precedence -----------------------------------------------------------------------


def test_env_vars_set_values(monkeypatch):
    monkeypatch.setenv("RMSERVE_PORT", "9001")
    monkeypatch.setenv("RMSERVE_DTYPE", "bfloat16")
    monkeypatch.setenv("RMSERVE_MAX_WAIT_MS", "0.5")
    monkeypatch.setenv("RMSERVE_MODEL", "/models/x")
    s = Settings()
    assert (s.port, s.dtype, s.max_wait_ms, s.model) == (9001, "bfloat16", 0.5, "/models/x")


def test_a_bad_env_value_is_refused(monkeypatch):
    monkeypatch.setenv("RMSERVE_PORT", "not-a-port")
    with pytest.raises(ValidationError, match="port"):
        Settings()


def test_precedence_kwargs_over_env_over_yaml_over_defaults(tmp_path, monkeypatch):
    config = write(tmp_path, "port: 7000\nmax_batch_tokens: 1234\nmax_batch_size: 3\n")
    s = Settings(config=config)
    assert (s.port, s.max_batch_tokens, s.max_batch_size, s.host) == (7000, 1234, 3, "127.0.0.1")
    monkeypatch.setenv("RMSERVE_PORT", "7100")
    s = Settings(config=config)
    assert (s.port, s.max_batch_tokens, s.max_batch_size) == (7100, 1234, 3)
    s = Settings(config=config, port=7200)
    assert (s.port, s.max_batch_tokens, s.max_batch_size) == (7200, 1234, 3)


def test_config_file_named_by_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RMSERVE_CONFIG", str(write(tmp_path, "max_batch_size: 5\n")))
    s = Settings()
    assert (s.max_batch_size, s.config) == (5, tmp_path / "rmserve.yaml")


def test_config_kwarg_wins_over_config_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RMSERVE_CONFIG", str(write(tmp_path, "max_batch_size: 5\n", "env.yaml")))
    assert Settings(config=write(tmp_path, "max_batch_size: 6\n", "flag.yaml")).max_batch_size == 6


def test_an_empty_config_file_gives_defaults(tmp_path):
    s = Settings(config=write(tmp_path, ""))
    assert s.model_dump(exclude={"config"}) == Settings().model_dump(exclude={"config"})


def test_yaml_models_in_order(tmp_path):
    config = write(
        tmp_path,
        "models:\n"
        "  - {name: b, path: /m/b, dtype: bfloat16, max_length: 2048}\n"
        "  - {name: a, path: demo}\n"
        "  - {name: c, path: /m/c, max_join_padding: 0}\n",
    )
    assert Settings(config=config).served_models() == [
        ModelSpec(name="b", path="/m/b", dtype="bfloat16", max_length=2048),
        ModelSpec(name="a", path="demo"),
        ModelSpec(name="c", path="/m/c", max_join_padding=0),
    ]


def test_models_from_env_json(monkeypatch):
    monkeypatch.setenv("RMSERVE_MODELS", '[{"name": "a", "path": "demo"}, {"name": "b", "path": "/m/b"}]')
    assert Settings().served_models() == [ModelSpec(name="a", path="demo"), ModelSpec(name="b", path="/m/b")]


# --- errors ---------------------------------------------------------------------------------------


def test_model_flag_and_config_models_conflict(tmp_path):
    config = write(tmp_path, "models:\n  - {name: a, path: demo}\n")
    with pytest.raises(ValidationError) as error:
        Settings(config=config, model="/x")
    message = str(error.value)
    assert "both --model and a config 'models' list were given" in message
    assert "remove --model / RMSERVE_MODEL" in message


def test_model_env_and_config_models_conflict(tmp_path, monkeypatch):
    monkeypatch.setenv("RMSERVE_MODEL", "/x")
    config = write(tmp_path, "models:\n  - {name: a, path: demo}\n")
    with pytest.raises(ValidationError, match="both --model and a config 'models' list were given"):
        Settings(config=config)


def test_duplicate_model_names(tmp_path):
    config = write(tmp_path, "models:\n  - {name: a, path: demo}\n  - {name: a, path: /x}\n")
    with pytest.raises(ValidationError, match=r"model names must be unique; repeated: a \["):
        Settings(config=config)
    config = write(
        tmp_path,
        "models:\n"
        "  - {name: b, path: demo}\n  - {name: a, path: /x}\n  - {name: b, path: /y}\n  - {name: a, path: /z}\n",
    )
    with pytest.raises(ValidationError, match=r"repeated: a, b \["):
        Settings(config=config)
    with pytest.raises(ValidationError, match=r"repeated: a \["):
        Settings(models=(ModelSpec(name="a", path="demo"), ModelSpec(name="a", path="/x")))


def test_a_model_without_a_name_is_a_validation_error(tmp_path):
    with pytest.raises(ValidationError, match="name"):
        Settings(config=write(tmp_path, "models:\n  - {path: demo}\n"))


def test_missing_config_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ValueError) as error:
        Settings(config=missing)
    assert str(error.value) == f"config file {missing} does not exist; check --config / RMSERVE_CONFIG."


def test_unknown_keys_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="batch_tokens\n  Extra inputs are not permitted"):
        Settings(batch_tokens=5)
    with pytest.raises(ValidationError, match="max_batch_tokenz\n  Extra inputs are not permitted"):
        Settings(config=write(tmp_path, "max_batch_tokenz: 5\n"))
    with pytest.raises(ValidationError, match="dtyp\n  Extra inputs are not permitted"):
        Settings(config=write(tmp_path, "models:\n  - {name: a, path: demo, dtyp: float32}\n"))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ModelSpec(name="a", path="demo", nmae="b")


def test_bad_values_are_refused():
    with pytest.raises(ValidationError, match="dtype"):
        Settings(dtype="float16")
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings(max_batch_size=0)
    with pytest.raises(ValidationError, match="port"):
        Settings(port=70000)
    with pytest.raises(ValidationError, match="name"):
        ModelSpec(name="-bad", path="demo")


def test_yaml_must_be_a_mapping(tmp_path):
    config = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ValueError) as error:
        Settings(config=config)
    assert str(error.value) == f"config file {config} must hold a mapping of settings, got list."


def test_yaml_may_not_name_another_config(tmp_path):
    config = write(tmp_path, "config: other.yaml\n")
    with pytest.raises(ValueError) as error:
        Settings(config=config)
    assert str(error.value) == f"config file {config} may not name another config file."
