"""Settings: the one frozen object every other module receives; the only reader of the environment.

Sources, highest priority first: explicit values (CLI flags), environment variables ``RMSERVE_<NAME>``
(e.g. ``RMSERVE_PORT=9000``), the YAML file named by ``config`` / ``RMSERVE_CONFIG``, then defaults.

A YAML config can serve several models at once::

    max_batch_tokens: 8192
    models:
      - name: demo
        path: demo
      - name: my-rm
        path: /models/my-rm
        dtype: bfloat16
        max_length: 2048

Requests pick a model with ``"model": NAME``; the first one listed is the default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rmserve.names import (
    CPU_JOIN_PADDING,
    CPU_PACKED_TOKENS,
    DEFAULT_DEMOS,
    DEMO_MODELS,
    PREFIX_MIN_TOKENS,
    DTypeName,
    KernelsName,
    KindName,
    Pooling,
    QuantizeName,
    RewardName,
    Truncation,
)

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_memory_size(text: str) -> int:
    """Bytes in a size such as ``70GiB``, ``512 MB``, ``1.5gb`` or ``75000000000``.

    Units (case-insensitive): B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024).

    Raises:
        ValueError: not a positive size with a known unit.
    """
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{text!r} is not a memory size; write bytes (75000000000) or a number with a unit: "
            "KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 70GiB."
        )
    number = match.group(1)
    if not unit and "." in number:
        raise ValueError(f"{text!r}: a size in bytes is a whole number; give a unit for fractions (1.5GiB).")
    size = int(float(number) * _UNITS[unit]) if "." in number else int(number) * _UNITS[unit]
    if size <= 0:
        raise ValueError(f"{text!r}: the memory budget must be more than 0 bytes.")
    return size


@dataclass(frozen=True)
class LoadOptions:
    """How a model folder loads: the keyword options every backend, the loader and the memory estimate take.

    Attributes:
        kind: the configured kind (``auto``: the folder's own); the loader checks it against the folder.
        dtype: weights dtype (``auto``: bfloat16 on a GPU that supports it, else float32).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        max_length: the most tokens per input (None: the model's own limit).
        kernels: ``auto`` (Triton on CUDA, torch elsewhere), ``triton`` or ``reference``.
        quantize: ``none``, ``int8`` or ``nf4`` (bitsandbytes, ``rmserve.models.quantize``).
        pooling: ``hf`` or ``last`` (``rmserve.models.pooling``); None: the folder's declaration, else hf.
        max_packed_tokens: decoders: the most tokens of a batch run packed, without padding
            (``rmserve.models.packing``); 0: never; None: by device.
        compile: decoders: run unplanned forwards through torch.compile (``rmserve.models.compile``).
        cpu_row_threads: decoders on the CPU: a batch's parts run side by side on this many threads
            (``rmserve.models.parallel``); 1: one forward on every core.
    """

    kind: KindName = "auto"
    dtype: DTypeName = "auto"
    device: str = "auto"
    max_length: int | None = None
    kernels: KernelsName = "auto"
    quantize: QuantizeName = "none"
    pooling: Pooling | None = None
    max_packed_tokens: int | None = None
    compile: bool = False
    cpu_row_threads: int = 1


_POOLING_HELP = (
    "Which token decoders score: hf (transformers' rule: the last token that is not the pad token) or last "
    "(the final token: OpenRLHF's and vLLM's convention); default: what the model folder's rmserve.json "
    "declares, else hf."
)


_PACKED_HELP = (
    "Decoder models (Llama, Qwen2, GPT-NeoX): a batch of at most this many tokens runs as one packed sequence, "
    "each input attending only to itself (exact), whenever that costs less than padding it; 0: always padded. "
    f"Default by device: {CPU_PACKED_TOKENS} on CPU (padding costs as much as real tokens there), 0 on GPU."
)


_PREFIX_HELP = (
    "Inputs of a decoder model that begin with the same tokens (GRPO's and best-of-n's responses to one prompt) "
    "compute that prefix once when it is at least this many tokens; 0 turns prefix sharing off."
)


_DUPLICATES_HELP = (
    "Scored inputs each model keeps (least recently used dropped first) to answer exact repeats (same tokens, "
    "same lambdas) without a forward; 0 turns the duplicate cache off."
)


_COMPILE_HELP = (
    "Decoder models: run forwards through torch.compile (TorchInductor), compiled at load before the server "
    "is ready (tens of seconds to minutes on a CPU; on CPU it needs a C++ compiler); rewards equal eager "
    "ones to float32 rounding (measured speed: docs/benchmarks.md)."
)


_ROW_THREADS_HELP = (
    "Decoder models on the CPU: a batch of several inputs runs as this many parts side by side (packed rows, "
    "or slices of the padded batch), each on its own thread with cores / N torch threads; 1: one forward "
    "on every core. A batch of one input always gets every core."
)


_AUTOCAST_HELP = (
    "Run float32 models' forwards under torch.autocast in bfloat16: matmuls in bfloat16, weights and heads kept "
    "in float32 (measured speed and agreement with float32: docs/benchmarks.md)."
)


class ModelSpec(BaseModel):
    """One served model; unset fields take the server-wide value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", description="Name requests use."
    )
    path: str = Field(
        min_length=1,
        description="A local model folder, or a built-in demo: " + ", ".join(DEMO_MODELS) + ".",
    )
    kind: KindName = Field(
        "auto", description="Model kind; auto reads it from the folder (rmserve.json), else dense."
    )
    reward: RewardName | None = Field(
        None,
        description="What 'rewards' returns: an aggregate, or combined for dmoerm models (default: the model's "
        "own: combined for dmoerm, tradeoff for brme, else mean).",
    )
    uwo_lambda: float | None = Field(None, ge=0, allow_inf_nan=False, description="Default UWO lambda.")
    tradeoff_lambda: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="Default trade-off lambda."
    )
    dtype: DTypeName | None = None
    device: str | None = None
    quantize: QuantizeName | None = None
    pooling: Pooling | None = Field(None, description=_POOLING_HELP)
    max_length: int | None = Field(None, ge=2)
    truncation: Truncation | None = None
    max_batch_tokens: int | None = Field(None, ge=1)
    max_batch_size: int | None = Field(None, ge=1)
    max_join_padding: int | None = Field(None, ge=0)
    max_packed_tokens: int | None = Field(None, ge=0, description=_PACKED_HELP)
    prefix_min_tokens: int | None = Field(None, ge=0, description=_PREFIX_HELP)
    duplicate_cache_entries: int | None = Field(None, ge=0, description=_DUPLICATES_HELP)
    autocast: bool | None = Field(None, description=_AUTOCAST_HELP)
    compile: bool | None = Field(None, description=_COMPILE_HELP)
    reference_p99: float | None = Field(
        None,
        allow_inf_nan=False,
        description="The 99th percentile of this model's rewards on reference data: the run monitor's "
        "saturation counts rewards above it (default: each run's own baseline windows).",
    )


class Settings(BaseSettings):
    """Server settings. Each field is a CLI flag of ``rmserve serve`` and an env var ``RMSERVE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="RMSERVE_", frozen=True, extra="forbid")

    model: str | None = Field(
        None,
        description="Model to serve: a local model folder or a built-in demo ("
        + ", ".join(DEMO_MODELS)
        + "); default: "
        + ", ".join(DEFAULT_DEMOS)
        + ", unless a config lists models.",
    )
    config: Path | None = Field(None, description="YAML file with settings and a 'models' list.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    dtype: DTypeName = Field(
        "auto", description="Weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16."
    )
    device: str = Field("auto", description="Device: auto, cpu, cuda or cuda:N.")
    quantize: QuantizeName = Field(
        "none",
        description="Weight quantisation through bitsandbytes: none, int8 (8-bit weights) or nf4 (4-bit NormalFloat).",
    )
    memory_budget: str | None = Field(
        None,
        description="Memory the served models may use on their device, e.g. 70GiB or 75000000000 bytes "
        "(default: 90% of a GPU's memory, or the machine's available RAM on CPU); a config whose models "
        "do not fit is refused before loading.",
    )
    pooling: Pooling | None = Field(None, description=_POOLING_HELP)
    kernels: KernelsName = Field(
        "auto",
        description="Head/aggregate kernels: auto (Triton on CUDA, torch elsewhere), triton, reference.",
    )
    max_length: int | None = Field(
        None,
        ge=2,
        description="Most tokens per input (default: the model's limit, capped by max_batch_tokens).",
    )
    truncation: Truncation = Field(
        "left", description="Over-long inputs: left (keep the end), right, or error (422)."
    )
    max_batch_tokens: int = Field(
        8192, ge=16, description="Padded tokens per batch (batch size x longest input)."
    )
    max_batch_size: int = Field(64, ge=1, description="Inputs per batch.")
    max_join_padding: int | None = Field(
        None,
        ge=0,
        description="Most padding tokens an input may add to a batch by joining it; default by device: "
        f"{CPU_JOIN_PADDING} on CPU (padding is nearly pure loss there), unlimited on GPU.",
    )
    max_packed_tokens: int | None = Field(None, ge=0, description=_PACKED_HELP)
    prefix_min_tokens: int = Field(PREFIX_MIN_TOKENS, ge=0, description=_PREFIX_HELP)
    duplicate_cache_entries: int = Field(8192, ge=0, description=_DUPLICATES_HELP)
    autocast: bool = Field(False, description=_AUTOCAST_HELP)
    compile: bool = Field(False, description=_COMPILE_HELP)
    cpu_row_threads: int = Field(1, ge=1, description=_ROW_THREADS_HELP)
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        description="How long the oldest queued input waits for company before a partial batch runs, while its "
        "device is busy with another model's forward (on an idle device a batch runs at once).",
    )
    max_queue_tokens: int = Field(
        1_048_576, ge=16, description="Tokens that may wait per model; past it requests get 429."
    )
    max_inputs_per_request: int = Field(4096, ge=1, description="Inputs in one request; past it 413.")
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Request body size; past it 413.")
    request_timeout_s: float | None = Field(
        600.0,
        gt=0,
        description="A request not answered in this many seconds gets 504 and its queued inputs are dropped "
        "(unset: no limit).",
    )
    shutdown_timeout_s: float = Field(
        60.0, ge=0, description="On shutdown, how long accepted work may take to finish."
    )
    monitor_window: int = Field(
        256, ge=1, description="Run monitor: scored inputs per window of a run's time series."
    )
    monitor_max_runs: int = Field(
        64, ge=0, description="Run monitor: runs kept (least recently used dropped first); 0 turns it off."
    )
    monitor_max_windows: int = Field(
        512, ge=1, description="Run monitor: windows kept per run and model (oldest dropped first)."
    )
    monitor_baseline_windows: int = Field(
        3,
        ge=1,
        description="Run monitor: a run's first windows, which drift (and the default p99) is measured from.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "rmserve",
        description="Where the demo model is built (default ~/.cache/rmserve).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Logs on stderr: text, or json (one object per line, access records included)."
    )
    api_key: SecretStr | None = Field(
        None,
        description="API keys, comma-separated: when set, every route but /health and /ready needs "
        "'Authorization: Bearer <key>'. Set through RMSERVE_API_KEY or the YAML config; there is no flag, "
        "so keys never show in process lists.",
    )
    models: tuple[ModelSpec, ...] = Field((), description="Served models (from the YAML config).")

    @field_validator("models", mode="before")
    @classmethod
    def _names_unique(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            names = [m.get("name") if isinstance(m, dict) else getattr(m, "name", None) for m in value]
            dupes = sorted({str(n) for n in names if n is not None and names.count(n) > 1})
            if dupes:
                raise ValueError(f"model names must be unique; repeated: {', '.join(map(str, dupes))}")
        return value

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _memory_size(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):  # a YAML number of bytes
            value = str(value)
        if isinstance(value, str):
            try:
                parse_memory_size(value)
            except ValueError as exc:
                raise ValueError(f"--memory-budget / RMSERVE_MEMORY_BUDGET: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_model_source(self) -> Settings:
        if self.model is not None and self.models:
            raise ValueError(
                "both --model and a config 'models' list were given; serve either one model (--model) "
                "or the config's list (remove --model / RMSERVE_MODEL)."
            )
        return self

    def api_keys(self) -> list[str]:
        """The accepted API keys (none: authentication is off).

        Raises:
            ValueError: the setting is given but holds no key.
        """
        if self.api_key is None:
            return []
        keys = [k.strip() for k in self.api_key.get_secret_value().split(",") if k.strip()]
        if not keys:
            raise ValueError(
                "api_key is set but holds no key; unset RMSERVE_API_KEY or give comma-separated keys."
            )
        return keys

    def served_models(self) -> list[ModelSpec]:
        """The models to serve: the config's list, else ``--model``, else the demos built from shipped files
        (``DEFAULT_DEMOS``)."""
        if self.models:
            return list(self.models)
        if self.model is None:
            return [ModelSpec(name=name, path=name) for name in DEFAULT_DEMOS]
        path = self.model
        name = path if path in DEMO_MODELS else Path(path).expanduser().resolve().name
        return [ModelSpec(name=name, path=path)]

    def load_options(self, spec: ModelSpec) -> LoadOptions:
        """How ``spec`` loads: its own kind, dtype, device, max_length, quantize and pooling, else the
        server-wide ones, and the kernels; what both ``load_model`` and ``estimate_model`` take, so the
        memory plan sizes exactly what is then loaded."""
        return LoadOptions(
            kind=spec.kind,
            dtype=spec.dtype or self.dtype,
            device=spec.device or self.device,
            max_length=spec.max_length or self.max_length,
            kernels=self.kernels,
            quantize=spec.quantize or self.quantize,
            pooling=spec.pooling or self.pooling,
            max_packed_tokens=self.max_packed_tokens
            if spec.max_packed_tokens is None
            else spec.max_packed_tokens,
            compile=self.compile if spec.compile is None else spec.compile,
            cpu_row_threads=self.cpu_row_threads,
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls, init_settings, env_settings))


class _YamlSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by the ``config`` setting (flag or env)."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        init: PydanticBaseSettingsSource,
        env: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self._path = init().get("config") or env().get("config")

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        if not self._path:
            return {}
        path = Path(self._path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist; check --config / RMSERVE_CONFIG.")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(
                f"config file {path} must hold a mapping of settings, got {type(data).__name__}."
            )
        if "config" in data:
            raise ValueError(f"config file {path} may not name another config file.")
        return data
