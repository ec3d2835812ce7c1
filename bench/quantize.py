"""What ``--quantize int8|nf4`` does to the demo model: weight memory, agreement, accuracy and speed.

The demo model (``rmserve.demo.build.build_demo("demo")``) is loaded on the CPU in float32 (or ``--device cuda
--dtype bfloat16``, as ``bench/gpu.sh`` runs it), unquantised, int8 and nf4, through the same ``load_model`` the server uses, plus one comparison that is not a serving
mode: ``int8 LLM.int8()``, the same int8 weights run by bitsandbytes' own ``Linear8bitLt`` forward, which
also quantises the activations (outlier threshold 6). Each scores the held-out HH pairs the demo head's
accuracy is reported on (``rmserve.training.hh.split_indices``, chat template, left-truncated to
``rmserve.training.recipes.demo_head.MAX_LENGTH`` tokens), encoded once and batched once as the server batches
them (length-sorted, default limits), so every model computes on exactly the same batches. Batches run
round-robin across the models (a rotating order per batch) so that noise on this shared machine hits all
of them alike; a warm-up batch per model is not timed.

Reported per model: weight memory (``ModelInfo.weights_bytes``: parameters, buffers and bitsandbytes'
scales / absmax), held-out pairwise accuracy (chosen reward > rejected reward) with its 95% Wilson
interval, agreement with the unquantised model (same preferred response per pair; targets: >= 99% for
int8, >= 97% for nf4), max and mean absolute reward difference, and throughput in tokens/s.

``--sensitivity`` instead quantises one kind of projection at a time to nf4 (every layer's ``q_proj``,
then every ``k_proj``, ...; everything else unquantised) and reports each one's agreement and margin error:
where nf4's disagreement comes from, and whether keeping some layers unquantised could meet its target.

    python bench/quantize.py                            # every held-out pair (462); writes docs/benchmarks.md
    python bench/quantize.py --sensitivity --pairs 120  # its own section of docs/benchmarks.md
    python bench/quantize.py --pairs 16                 # a quick check: prints the report only

A main run on fewer pairs writes the report only when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from report import gpu_machine, machine, write_section  # bench/report.py: run as python bench/quantize.py

from rmserve.batching.planning import plan_offline
from rmserve.config import LoadOptions, Settings
from rmserve.demo.build import build_demo
from rmserve.models.base import Encoded, module_bytes, reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import Messages
from rmserve.models.loader import load_model
from rmserve.models.quantize import QUANTIZE_MODES, quantize_linears
from rmserve.names import QuantizeName
from rmserve.scoring.registry import resolve_limits
from rmserve.training.fitting import binomial_interval
from rmserve.training.hh import default_data_path, load_pairs, split_indices
from rmserve.training.recipes.demo_head import MAX_LENGTH

ROOT = Path(__file__).resolve().parents[1]
TARGET_AGREEMENT = {"int8": 0.99, "nf4": 0.97}
LLM_INT8 = "int8 LLM.int8()"  # the int8 weights under bitsandbytes' own forward (not a serving mode)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_bytes(model: DenseRewardModel) -> int:
    """Memory of the transformer's linear layers (the score head excluded), quantisation state included."""
    return sum(
        module_bytes(m)
        for m in model.model.modules()
        if isinstance(m, torch.nn.Linear) and m is not model.head
    )


@dataclass(frozen=True)
class Target:
    """Where the models run: ``cpu`` / ``float32`` by default, ``cuda`` / ``bfloat16`` on a GPU."""

    device: str
    dtype: str

    def describe(self) -> str:
        where = f"GPU: {gpu_machine()}" if self.device.startswith("cuda") else f"Machine: {machine()}. No GPU"
        return f"{where}; {self.dtype} model dtype (int8 and nf4 compute in {self.dtype})"


def load_demo(folder: Path, quantize: QuantizeName, target: Target) -> DenseRewardModel:
    """The demo model on ``target``, quantised as the server would load it."""
    model = load_model(
        "demo", folder, LoadOptions(dtype=target.dtype, device=target.device, quantize=quantize)
    )
    assert isinstance(model, DenseRewardModel), f"the demo is a dense model, got {model.info.kind}"
    return model


def llm_int8(folder: Path, target: Target) -> DenseRewardModel:
    """The int8 demo with bitsandbytes' own ``Linear8bitLt`` forward (LLM.int8(), threshold 6) restored."""
    # its notice that activations are cast to float16 to be quantised would come at every layer's forward
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    model = load_demo(folder, "int8", target)
    for layer in model.model.modules():
        if "forward" in vars(layer) and type(layer).__name__ == "Linear8bitLt":
            del layer.forward  # the instance's weight-only forward; the class's is LLM.int8()
    return model


def nf4_only(folder: Path, projection: str, target: Target) -> DenseRewardModel:
    """The demo with only every layer's ``projection`` quantised to nf4 (the server's nf4 layers)."""
    model = load_demo(folder, "none", target)
    keep = ("score", *(p for p in PROJECTIONS if p != projection))
    quantize_linears(model.model, "nf4", dtype=model.dtype, device=model.device, keep=keep)
    return model


@dataclass(frozen=True)
class Scored:
    """One model's rewards on the held-out dialogues (chosen_0, rejected_0, ...) and its compute time."""

    model: DenseRewardModel
    rewards: torch.Tensor  # (2P,) float64
    seconds: float

    def margins(self) -> torch.Tensor:
        """(P,) chosen reward minus rejected reward."""
        return self.rewards[0::2] - self.rewards[1::2]


def score_round_robin(
    models: dict[str, DenseRewardModel], encoded: list[Encoded], batches: list[list[int]]
) -> dict[str, Scored]:
    """Every model's rewards on ``encoded``, batch by batch, the models' order rotating per batch."""
    names = list(models)
    for name in names:  # warm-up, not timed
        reward_values(models[name], [encoded[i] for i in batches[0]])
    rewards = {name: torch.zeros(len(encoded), dtype=torch.float64) for name in names}
    seconds = dict.fromkeys(names, 0.0)
    for number, batch in enumerate(batches):
        items = [encoded[i] for i in batch]
        for name in names[number % len(names) :] + names[: number % len(names)]:
            start = time.perf_counter()
            values = reward_values(models[name], items)
            seconds[name] += time.perf_counter() - start
            rewards[name][batch] = torch.tensor(values, dtype=torch.float64)
        if (number + 1) % 10 == 0 or number + 1 == len(batches):
            done = ", ".join(f"{n} {seconds[n]:.0f}s" for n in names)
            print(f"batch {number + 1}/{len(batches)}: {done}", file=sys.stderr, flush=True)
    return {name: Scored(models[name], rewards[name], seconds[name]) for name in names}


def agreement(scored: Scored, reference: Scored) -> float:
    """Share of pairs whose preferred response is the reference's."""
    return float(((scored.margins() > 0) == (reference.margins() > 0)).double().mean())


def section_head(title: str, target: Target, command: str) -> list[str]:
    """A report section's first lines: its title, where it ran and the command that produced it."""
    return [title, "", f"{target.describe()}.", "", "```", command, "```", ""]


def report(
    scored: dict[str, Scored], *, pairs: int, tokens: int, setup: str, command: str, target: Target
) -> str:
    """The markdown section: one row per model, then the unquantised-vs-quantised comparison."""
    none = scored["none"]
    reference, ref_margins = none.rewards, none.margins()
    embeddings = none.model.model.get_input_embeddings().weight.numel()
    ref_bytes, ref_linear = none.model.info.weights_bytes, linear_bytes(none.model)
    rows = []
    for name, s in scored.items():
        held = binomial_interval(int((s.margins() > 0).sum()), pairs)
        diff = (s.rewards - reference).abs()
        correlation = float(torch.corrcoef(torch.stack([s.margins(), ref_margins]))[0, 1])
        goal = f">= {TARGET_AGREEMENT[name]:.0%}" if name in TARGET_AGREEMENT else ""
        linear = linear_bytes(s.model)
        rows.append(
            f"| {name} | {s.model.info.weights_bytes / 2**20:.1f} | {ref_bytes / s.model.info.weights_bytes:.2f}x "
            f"| {linear / 2**20:.1f} | {ref_linear / linear:.2f}x "
            f"| {held.value:.4f} [{held.low:.3f}, {held.high:.3f}] | {agreement(s, none):.2%} | {goal} "
            f"| {correlation:.4f} | {float(diff.max()):.4f} | {float(diff.mean()):.4f} | {tokens / s.seconds:.0f} "
            f"| {none.seconds / s.seconds:.2f}x |"
        )
    lines = [
        *section_head("## Weight quantisation (`bench/quantize.py`)", target, command),
        f"The demo model (SmolLM2-135M reward model) loaded unquantised, int8 and nf4 through bitsandbytes, "
        f"plus `{LLM_INT8}`: the same int8 weights under bitsandbytes' own `Linear8bitLt` forward, which also "
        f"quantises the activations (not a serving mode; the comparison behind int8's weight-only forward). "
        f"{setup} The unquantised rewards' standard deviation is {statistics.pstdev(reference.tolist()):.3f}.",
        "",
        "| quantize | weights MiB | smaller by | linear layers MiB | smaller by | held-out accuracy [95% CI] "
        "| same preference as none | agreement target | margin correlation with none | max abs reward diff "
        "| mean abs reward diff | tokens/s | speed vs none |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "Weights: parameters, buffers and bitsandbytes' scales (int8: a float32 scale per output row; nf4: a "
        f"float32 absmax per block of 64 weights). The embeddings ({embeddings / 1e6:.1f}M of the "
        f"{none.model.info.parameters / 1e6:.1f}M parameters), norms and score head stay unquantised, so the whole "
        "model shrinks less than its linear layers do. Margin: a pair's chosen reward minus its rejected reward; "
        f"the unquantised margins' mean absolute value is {float(ref_margins.abs().mean()):.4f}, so a reward "
        "change of that size can flip a preference.",
    ]
    return "\n".join(lines) + "\n"


def sensitivity_report(scored: dict[str, Scored], *, setup: str, command: str, target: Target) -> str:
    """The markdown section of ``--sensitivity``: one row per projection quantised alone, then all of them."""
    none = scored["none"]
    ref_linear = linear_bytes(none.model)
    rows = []
    for name, s in scored.items():
        if name == "none":
            continue
        flips = int(((s.margins() > 0) != (none.margins() > 0)).sum())
        error = float((s.margins() - none.margins()).pow(2).mean().sqrt())
        rows.append(
            f"| {name} | {(ref_linear - linear_bytes(s.model)) / 2**20:.1f} | {agreement(s, none):.2%} | {flips} "
            f"| {error:.4f} | {float((s.rewards - none.rewards).abs().mean()):.4f} |"
        )
    lines = [
        *section_head(
            "## nf4 sensitivity per projection (`bench/quantize.py --sensitivity`)", target, command
        ),
        f"The demo model with one kind of projection quantised to nf4 in all 30 layers and every other weight "
        f"unquantised, then all seven (`--quantize nf4`). {setup} The unquantised margins' mean absolute value is "
        f"{float(none.margins().abs().mean()):.4f}.",
        "",
        "| nf4 on | MiB saved | same preference as none | flipped pairs | RMS margin error | mean abs reward diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]
    return "\n".join(lines) + "\n"


def held_out_dialogues(data: Path, limit: int | None) -> tuple[list[int], list[int], list[Messages]]:
    """The held-out pairs to score (the first ``limit``, or all), every held-out pair, and the chosen pairs'
    dialogues in order (chosen_0, rejected_0, chosen_1, ...)."""
    pairs = load_pairs(data)
    _, held_out = split_indices(len(pairs))
    chosen = held_out if limit is None else held_out[:limit]
    dialogues = [Messages(messages=d) for i in chosen for d in (pairs[i].chosen, pairs[i].rejected)]
    return chosen, held_out, dialogues


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs", type=int, default=None, help="score the first N held-out pairs (default all)"
    )
    parser.add_argument("--sensitivity", action="store_true", help="nf4 on one kind of projection at a time")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--data", type=Path, default=default_data_path(ROOT), help="HH-RLHF JSONL(.gz) file")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report file (default docs/benchmarks.md, or docs/benchmarks-gpu.md on cuda, on a full run and "
        "with --sensitivity)",
    )
    args = parser.parse_args(argv)

    settings = Settings()
    chosen, held_out, dialogues = held_out_dialogues(args.data, args.pairs)
    folder = build_demo("demo", settings.cache_dir)
    target = Target(args.device, args.dtype)
    models: dict[str, DenseRewardModel] = {"none": load_demo(folder, "none", target)}
    if args.sensitivity:
        models |= {projection: nf4_only(folder, projection, target) for projection in PROJECTIONS}
        models["all seven"] = load_demo(folder, "nf4", target)
    else:
        models |= {q: load_demo(folder, q, target) for q in QUANTIZE_MODES if q != "none"}
        models[LLM_INT8] = llm_int8(folder, target)
    encoded = models["none"].new_encoder(MAX_LENGTH).encode_many(dialogues, "left")
    limits, _, _ = resolve_limits(settings, None, models["none"].info)
    batches = plan_offline([len(e) for e in encoded], limits)
    scored = score_round_robin(models, encoded, batches)

    tokens = sum(len(e) for e in encoded)
    setup = (
        f"{len(chosen)} held-out HH-RLHF pairs ({2 * len(chosen)} dialogues, {tokens} tokens, chat template, "
        f"left-truncated to {MAX_LENGTH} tokens), in the same {len(batches)} batches for every model "
        f"(max_batch_tokens={limits.max_batch_tokens}, max_join_padding={limits.max_join_padding}), run "
        "round-robin."
    )
    flags = "".join(
        flag
        for flag, given in (
            (f" --device {args.device}", args.device != "cpu"),
            (f" --dtype {args.dtype}", args.dtype != "float32"),
            (f" --pairs {args.pairs}", args.pairs is not None),
            (" --sensitivity", args.sensitivity),
        )
        if given
    )
    command = f"python bench/quantize.py{flags}"
    if args.sensitivity:
        text = sensitivity_report(scored, setup=setup, command=command, target=target)
        section, writes = "bench/quantize.py --sensitivity", True
    else:
        text = report(scored, pairs=len(chosen), tokens=tokens, setup=setup, command=command, target=target)
        section, writes = "bench/quantize.py", len(chosen) == len(held_out)
    report_file = "benchmarks-gpu.md" if args.device.startswith("cuda") else "benchmarks.md"
    out = args.out if args.out is not None else (ROOT / "docs" / report_file if writes else None)
    if out is not None:
        write_section(out, section, text)
    print(text)


if __name__ == "__main__":
    main()
