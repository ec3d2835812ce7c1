"""The MoE routing and grouped SwiGLU Triton kernels against their torch references, and the references by hand.

The kernel tests take ``kernel_device``: the GPU, else Triton's interpreter (see tests/interpreter.py).
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import rmserve_kernels
import rmserve_kernels.experts
import rmserve_kernels.moe_layer
import rmserve_kernels.routing
from rmserve_kernels.experts import grouped_swiglu_reference, grouped_swiglu_triton
from rmserve_kernels.moe_layer import (
    REFERENCE_KERNELS,
    TRITON_KERNELS,
    moe_layer_reference,
    moe_layer_triton,
    select_moe_kernels,
)
from rmserve_kernels.routing import (
    MAX_KERNEL_EXPERTS,
    MAX_KERNEL_TOP_K,
    Routing,
    route_reference,
    route_triton,
)
from rmserve_kernels.tuning import MIN_DOT_SIDE, tuning_configs
from tests.interpreter import (
    INTERPRETING,
    assert_autotuned_only_when_compiled,
    launch_candidate_alone,
    needs_triton,
    rerun_in_the_interpreter,
)


def make_layer(
    tokens: int, hidden: int, ffn: int, experts: int, *, seed: int, top_k: int = 2
) -> dict[str, Any]:
    """Keyword arguments of ``moe_layer_*``: x ~ N(0, 1), every weight at nn.Linear's scale N(0, 1/fan_in).

    At that scale the SwiGLU outputs are O(1) and float32 rounding stays far below 1e-5; the router's
    logits are O(1) too, so the affinities are spread out and the routing varies from token to token.
    """
    g = torch.Generator().manual_seed(seed)
    a, b = 1 / math.sqrt(hidden), 1 / math.sqrt(ffn)
    return {
        "x": torch.randn(tokens, hidden, generator=g),  # (T, H)
        "router_weight": torch.randn(experts, hidden, generator=g) * a,  # (E, H)
        "shared": (
            torch.randn(ffn, hidden, generator=g) * a,  # (F, H)
            torch.randn(ffn, hidden, generator=g) * a,  # (F, H)
            torch.randn(hidden, ffn, generator=g) * b,  # (H, F)
        ),
        "gate": torch.randn(experts, ffn, hidden, generator=g) * a,  # (E, F, H)
        "up": torch.randn(experts, ffn, hidden, generator=g) * a,  # (E, F, H)
        "down": torch.randn(experts, hidden, ffn, generator=g) * b,  # (E, H, F)
        "top_k": top_k,
    }


def to(device: torch.device, inputs: dict[str, Any]) -> dict[str, Any]:
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        return tuple(move(v) for v in value) if isinstance(value, tuple) else value

    return {name: move(value) for name, value in inputs.items()}


def experts_of(inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``grouped_swiglu_*`` but routing, from ``make_layer``'s."""
    return {name: inputs[name] for name in ("x", "gate", "up", "down")}


# --- naive per-token oracles (the module may not loop over tokens; the tests may) ---------------------


def ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The plain SwiGLU FFN in float64: x (..., H), gate/up (F, H), down (H, F) -> (..., H)."""
    x, gate, up, down = (t.double() for t in (x, gate, up, down))
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def naive_route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, rule: str = "xft") -> Routing:
    """The routing of eq. 6-7 token by token, in float64 and Python sorting (ties: lowest index)."""
    indices, weights, shared = [], [], []
    for row in x.double():
        logits = (router_weight.double() @ row).tolist()  # (E,)
        peak = max(logits)
        z = [math.exp(v - peak) for v in logits]
        s = [v / sum(z) for v in z]
        chosen = sorted(range(len(s)), key=lambda e: (-s[e], e))[:top_k]
        s_max, total = s[chosen[0]], sum(s[e] for e in chosen)
        indices.append(chosen)
        if rule == "xft":  # softmax over the selected affinities, times s_max
            exps = [math.exp(s[e]) for e in chosen]
            weights.append([v / sum(exps) * s_max for v in exps])
        else:
            weights.append([s[e] / total * s_max for e in chosen])
        shared.append(1 - s_max)
    return Routing(torch.tensor(indices), torch.tensor(weights), torch.tensor(shared))


def naive_grouped(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, routing: Routing
) -> torch.Tensor:
    """Every token's weighted routed experts, one (token, slot) at a time, in float64: (T, H)."""
    out = torch.zeros(x.shape, dtype=torch.float64)  # (T, H)
    for t in range(x.shape[0]):
        for j in range(routing.expert_index.shape[1]):
            e = int(routing.expert_index[t, j])
            out[t] += float(routing.expert_weight[t, j]) * ffn(x[t], gate[e], up[e], down[e])
    return out


def assert_routing_matches(out: Routing, ref: Routing) -> None:
    """The same experts, and weights within 1e-5 (they are probabilities: at most 1)."""
    assert out.expert_index.dtype == torch.long and out.expert_index.shape == ref.expert_index.shape
    assert out.expert_weight.dtype == out.shared_weight.dtype == torch.float32
    assert torch.equal(out.expert_index, ref.expert_index)
    torch.testing.assert_close(out.expert_weight, ref.expert_weight, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(out.shared_weight, ref.shared_weight, rtol=1e-5, atol=1e-5, equal_nan=True)


def assert_outputs_match(out: torch.Tensor, ref: Any) -> None:
    """rtol 1e-5 and an atol of 1e-5 times the largest output (at least 1e-5).

    Why scaled: the float32 rounding of a dot product is relative to the size of its terms, not of its
    result, so where outputs reach 1e2 or more (the large-magnitude test) an output near 0 carries
    rounding well above an absolute 1e-5 in any implementation, torch's included. For the O(1) outputs of
    the other tests this is plain ``assert_close(rtol=1e-5, atol=1e-5)``.
    """
    ref = torch.as_tensor(ref, dtype=out.dtype, device=out.device)
    atol = 1e-5 * max(1.0, ref.abs().max().item()) if ref.numel() else 1e-5
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol)


# --- routing reference --------------------------------------------------------------------------------


def test_route_reference_on_a_hand_computed_example():
    # Logits are the log-affinities: token 0 has s = (0.5, 0.3, 0.2), token 1 has s = (0.2, 0.7, 0.1).
    router_weight = torch.log(torch.tensor([[0.5, 0.2], [0.3, 0.7], [0.2, 0.1]]))  # (N-1=3, H=2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (T=2, H=2)
    routing = route_reference(x, router_weight, 2, "renorm")
    assert routing.expert_index.tolist() == [[0, 1], [1, 0]]
    # renorm: g_i = s_i / (sum of the selected s) * s_max; g_shared = 1 - s_max.
    want = [[0.5 / 0.8 * 0.5, 0.3 / 0.8 * 0.5], [0.7 / 0.9 * 0.7, 0.2 / 0.9 * 0.7]]
    torch.testing.assert_close(routing.expert_weight, torch.tensor(want))  # 0.3125, 0.1875 / 0.5444, 0.1556
    torch.testing.assert_close(routing.shared_weight, torch.tensor([0.5, 0.3]))
    # xft (the default, eq. 7): g_i = exp(s_i) / (sum of the selected exp(s)) * s_max.
    xft = route_reference(x, router_weight, 2)
    e = math.exp
    want = [
        [e(0.5) / (e(0.5) + e(0.3)) * 0.5, e(0.3) / (e(0.5) + e(0.3)) * 0.5],  # 0.2750, 0.2250
        [e(0.7) / (e(0.7) + e(0.2)) * 0.7, e(0.2) / (e(0.7) + e(0.2)) * 0.7],  # 0.4390, 0.2610
    ]
    torch.testing.assert_close(xft.expert_weight, torch.tensor(want))
    torch.testing.assert_close(xft.shared_weight, torch.tensor([0.5, 0.3]))
    for rule in ("xft", "renorm"):  # K-1 = 1: the top expert gets s_max itself under both rules
        one = route_reference(x, router_weight, 1, rule)
        assert one.expert_index.tolist() == [[0], [1]]
        torch.testing.assert_close(one.expert_weight, torch.tensor([[0.5], [0.7]]))
        torch.testing.assert_close(one.shared_weight, torch.tensor([0.5, 0.3]))


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_xft_routing_is_the_formula_of_eq_7(top_k):
    # g_i = Softmax(s_i over the K-1 selected) * s_max, written out with the affinities s = softmax(logits).
    inputs = make_layer(11, 16, 16, 7, seed=30 + top_k)
    x, router_weight = inputs["x"], inputs["router_weight"] * 3  # (T, H), (N-1, H)
    s = torch.softmax(x.double() @ router_weight.double().T, dim=-1)  # (T, N-1)
    top, order = s.sort(dim=-1, descending=True, stable=True)  # (T, N-1)
    selected = top[:, :top_k]  # (T, K-1)
    want = selected.exp() / selected.exp().sum(dim=-1, keepdim=True) * top[:, :1]  # (T, K-1)
    routing = route_reference(x, router_weight, top_k, "xft")
    assert torch.equal(routing.expert_index, order[:, :top_k])
    torch.testing.assert_close(routing.expert_weight, want.float())
    torch.testing.assert_close(routing.shared_weight, (1 - top[:, 0]).float())
    if top_k > 1:  # the two rules differ once more than one normal expert is selected
        renorm = route_reference(x, router_weight, top_k, "renorm")
        assert not torch.allclose(renorm.expert_weight, routing.expert_weight)


def test_an_unknown_routing_rule_is_refused():
    inputs = make_layer(2, 16, 16, 3, seed=1)
    with pytest.raises(ValueError, match="routing rule 'softmax' is unknown; use one of xft, renorm"):
        route_reference(inputs["x"], inputs["router_weight"], 1, "softmax")  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", ["xft", "renorm"])
@pytest.mark.parametrize(("experts", "top_k"), [(3, 1), (3, 2), (7, 2), (15, 3), (4, 4)])
def test_route_reference_weights_sum_to_one_and_match_a_naive_router(experts, top_k, rule):
    inputs = make_layer(23, 32, 16, experts, seed=experts + top_k)
    routing = route_reference(inputs["x"], inputs["router_weight"], top_k, rule)
    total = routing.expert_weight.sum(dim=1) + routing.shared_weight  # (T,)
    torch.testing.assert_close(total, torch.ones(23), rtol=0, atol=1e-6)
    assert torch.all(routing.expert_weight >= 0) and torch.all(routing.shared_weight >= 0)
    assert torch.all(routing.expert_weight[:, :-1] >= routing.expert_weight[:, 1:])  # by decreasing affinity
    naive = naive_route(inputs["x"], inputs["router_weight"], top_k, rule)
    assert torch.equal(routing.expert_index, naive.expert_index)
    torch.testing.assert_close(routing.expert_weight, naive.expert_weight.float())
    torch.testing.assert_close(routing.shared_weight, naive.shared_weight.float())


def test_route_reference_breaks_ties_by_lowest_index():
    # Equal router rows give equal logits: experts 1 and 3 lead (logit 2), then 0 and 2 (logit 1).
    router_weight = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # (4, 2)
    x = torch.tensor([[1.0, 5.0]])  # (1, 2)
    assert route_reference(x, router_weight, 1).expert_index.tolist() == [[1]]
    assert route_reference(x, router_weight, 2).expert_index.tolist() == [[1, 3]]
    assert route_reference(x, router_weight, 3).expert_index.tolist() == [[1, 3, 0]]
    # An all-zero router: every affinity is 1/4, the first k experts win and share s_max = 1/4 equally.
    uniform = route_reference(torch.randn(3, 2), torch.zeros(4, 2), 2)
    assert uniform.expert_index.tolist() == [[0, 1]] * 3
    torch.testing.assert_close(uniform.expert_weight, torch.full((3, 2), 0.125))
    torch.testing.assert_close(uniform.shared_weight, torch.full((3,), 0.75))


# --- grouped experts and layer reference --------------------------------------------------------------


def uneven_routing(tokens: int, experts: int, top_k: int, *, seed: int, unused: int) -> Routing:
    """Expert 0 in every token (several tiles' worth), expert ``unused`` in none, the rest at random."""
    g = torch.Generator().manual_seed(seed)
    others = torch.tensor([e for e in range(1, experts) if e != unused])  # (E-2,)
    picks = torch.stack(
        [others[torch.randperm(len(others), generator=g)[: top_k - 1]] for _ in range(tokens)]
    )
    index = torch.cat([torch.zeros(tokens, 1, dtype=torch.long), picks], dim=1)  # (T, k)
    weight = torch.rand(tokens, top_k, generator=g)  # (T, k)
    return Routing(index, weight, 1 - weight.sum(dim=1))


def test_grouped_reference_equals_a_per_token_loop():
    inputs = make_layer(29, 32, 24, 5, seed=1)
    routing = uneven_routing(29, 5, 3, seed=2, unused=2)
    out = grouped_swiglu_reference(**experts_of(inputs), routing=routing)
    assert out.dtype == torch.float32 and out.shape == (29, 32)
    assert_outputs_match(out, naive_grouped(**experts_of(inputs), routing=routing))
    # With the layer's own routing too.
    routing = route_reference(inputs["x"], inputs["router_weight"], 2)
    out = grouped_swiglu_reference(**experts_of(inputs), routing=routing)
    assert_outputs_match(out, naive_grouped(**experts_of(inputs), routing=routing))


def test_moe_layer_reference_equals_the_layer_token_by_token():
    inputs = make_layer(17, 32, 24, 7, seed=3, top_k=2)
    routing = naive_route(inputs["x"], inputs["router_weight"], 2)
    want = routing.shared_weight[:, None] * ffn(inputs["x"], *inputs["shared"])  # (T, H)
    want += naive_grouped(**experts_of(inputs), routing=routing)
    assert_outputs_match(moe_layer_reference(**inputs), want)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_upcycled_layer_with_identical_experts_is_the_dense_ffn(top_k):
    # Upcycling copies the FFN into every expert: whatever the router, the weights sum to 1, so the layer
    # starts out as exactly the FFN it replaces.
    inputs = make_layer(19, 32, 48, 5, seed=4 + top_k, top_k=top_k)
    gate, up, down = inputs["shared"]
    inputs["router_weight"] = inputs["router_weight"] * 4  # peaky routing: weights far from uniform
    inputs.update(gate=gate.expand(5, -1, -1), up=up.expand(5, -1, -1), down=down.expand(5, -1, -1))
    dense = F.silu(inputs["x"] @ gate.T) * (inputs["x"] @ up.T) @ down.T  # (T, H)
    torch.testing.assert_close(moe_layer_reference(**inputs), dense, rtol=1e-5, atol=1e-5)


def test_reference_keeps_the_input_dtype_and_accumulates_in_float32():
    inputs = make_layer(9, 32, 24, 4, seed=5)
    routing = route_reference(inputs["x"], inputs["router_weight"], 2)
    half = {name: t.bfloat16() for name, t in experts_of(inputs).items()}
    out = grouped_swiglu_reference(**half, routing=routing)
    assert out.dtype == torch.bfloat16
    exact = naive_grouped(**half, routing=routing)  # the same bf16 numbers, in float64
    torch.testing.assert_close(out.float(), exact.float(), rtol=1e-2, atol=1e-2)  # bf16 output rounding
    layer = moe_layer_reference(**{**inputs, "x": inputs["x"].bfloat16()})
    assert layer.dtype == torch.bfloat16 and layer.shape == (9, 32)


def test_references_are_differentiable_for_training():
    # The router learns through the routing weights g_i and 1 - s_max (eq. 6-7), not only the experts.
    inputs = make_layer(11, 16, 24, 4, seed=11)
    weights = [inputs["router_weight"], inputs["gate"], inputs["down"], inputs["shared"][0]]
    for w in weights:
        w.requires_grad_(True)
    moe_layer_reference(**inputs).square().sum().backward()
    for w in weights:
        assert w.grad is not None and w.grad.abs().sum() > 0
    # The gradient of the router is that of the layer computed token by token.
    ours = inputs["router_weight"].grad.clone()
    inputs["router_weight"].grad = None
    routing = route_reference(inputs["x"], inputs["router_weight"], 2)
    per_token = routing.shared_weight[:, None] * ffn(inputs["x"], *inputs["shared"]).float()
    for t in range(11):
        for j in range(2):
            e = routing.expert_index[t, j]
            expert = ffn(inputs["x"][t], inputs["gate"][e], inputs["up"][e], inputs["down"][e]).float()
            per_token[t] = per_token[t] + routing.expert_weight[t, j] * expert
    per_token.square().sum().backward()
    torch.testing.assert_close(ours, inputs["router_weight"].grad, rtol=1e-4, atol=1e-6)


def test_references_on_an_empty_batch():
    inputs = make_layer(0, 32, 24, 4, seed=6)
    routing = route_reference(inputs["x"], inputs["router_weight"], 2)
    assert routing.expert_index.shape == routing.expert_weight.shape == (0, 2)
    assert routing.shared_weight.shape == (0,)
    assert grouped_swiglu_reference(**experts_of(inputs), routing=routing).shape == (0, 32)
    assert moe_layer_reference(**inputs).shape == (0, 32)


def _set(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda inputs: inputs.update({name: value() if callable(value) else value})


def _routing(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(inputs: dict[str, Any]) -> None:
        routing = route_reference(inputs["x"], inputs["router_weight"], 2)
        inputs["routing"] = Routing(**{**routing.__dict__, **{k: f(routing) for k, f in fields.items()}})

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("x", lambda: torch.zeros(2, 3, 8)), r"x must be a \(T, H\) floating tensor.*reshape\(-1, H\)"),
        (_set("x", lambda: torch.zeros(3, 8, dtype=torch.long)), r"x must be a \(T, H\) floating tensor"),
        (_set("router_weight", lambda: torch.zeros(4, 7)), r"router_weight must be a floating \(\*, 8\)"),
        (_set("top_k", 0), r"top_k=0 is not a number of routed experts: use 1\.\.4"),
        (_set("top_k", 5), r"top_k=5 is not a number of routed experts"),
        (_set("top_k", True), r"top_k=True is not a number"),
        (
            _set("router_weight", lambda: torch.zeros(3, 8)),
            r"router_weight routes to 3 experts but gate stacks 4",
        ),
        (_set("gate", lambda: torch.zeros(4, 6, 7)), r"gate must be a floating \(\*, \*, 8\) tensor"),
        (_set("up", lambda: torch.zeros(4, 5, 8)), r"up must be a floating \(4, 6, 8\) tensor"),
        (_set("down", lambda: torch.zeros(4, 6, 8)), r"down must be a floating \(4, 8, 6\) tensor"),
        (_set("shared", lambda: (torch.zeros(6, 8),) * 2), r"shared must be the shared expert's"),
        (
            _set("shared", lambda: (torch.zeros(6, 8), torch.zeros(6, 8), torch.zeros(6, 8))),
            r"shared down must be a floating \(8, 6\) tensor",
        ),
        (
            _set("router_weight", lambda: torch.zeros(4, 8, device="meta")),
            r"router_weight is on meta but x is on cpu; move it",
        ),
    ],
)
def test_invalid_layer_inputs_say_what_to_fix(change, message):
    inputs = make_layer(3, 8, 6, 4, seed=7)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        moe_layer_reference(**inputs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_routing(expert_index=lambda r: r.expert_index.int()), r"expert_index must be a \(3, K-1\) long"),
        (_routing(expert_index=lambda r: r.expert_index[:2]), r"expert_index must be a \(3, K-1\) long"),
        (_routing(expert_index=lambda r: r.expert_index + 3), r"values outside 0\.\.3, but there are 4"),
        (
            _routing(expert_weight=lambda r: r.expert_weight[:, :1]),
            r"expert_weight must be a floating \(3, 2\)",
        ),
        (_routing(shared_weight=lambda r: r.shared_weight[None]), r"shared_weight must be a floating \(3,\)"),
    ],
)
def test_invalid_routing_says_what_to_fix(change, message):
    inputs = make_layer(3, 8, 6, 4, seed=8)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        grouped_swiglu_reference(**experts_of(inputs), routing=inputs["routing"])


# --- choosing an implementation -----------------------------------------------------------------------


def test_select_on_cpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert select_moe_kernels(cpu) is REFERENCE_KERNELS
    assert select_moe_kernels(cpu, "auto") is REFERENCE_KERNELS
    assert select_moe_kernels(cpu, "reference") is REFERENCE_KERNELS
    assert REFERENCE_KERNELS.moe_layer is moe_layer_reference and TRITON_KERNELS.route is route_triton
    with pytest.raises(ValueError, match="kernels must be 'auto', 'triton' or 'reference'"):
        select_moe_kernels(cpu, "fast")  # type: ignore[arg-type]


@needs_triton
def test_select_triton_on_cpu_without_the_interpreter_says_how_to_fix(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"needs a CUDA device, got cpu\. Hint: .*TRITON_INTERPRET=1"):
        select_moe_kernels(torch.device("cpu"), "triton")
    inputs = make_layer(2, 16, 16, 3, seed=9)
    with pytest.raises(ValueError, match="the Triton kernel needs CUDA tensors, got cpu"):
        route_triton(inputs["x"], inputs["router_weight"], 2)
    with pytest.raises(ValueError, match="the Triton kernel needs CUDA tensors, got cpu"):
        moe_layer_triton(**inputs)


def test_select_triton_where_it_can_run(kernel_device):
    assert select_moe_kernels(kernel_device, "triton") is TRITON_KERNELS
    # Selection looks at the device type only: torch.device("cuda") needs no GPU.
    assert select_moe_kernels(torch.device("cuda"), "auto") is TRITON_KERNELS
    assert select_moe_kernels(torch.device("cpu"), "auto") is REFERENCE_KERNELS


@needs_triton
def test_triton_imported_in_the_other_mode_is_refused(monkeypatch: pytest.MonkeyPatch):
    # Flip TRITON_INTERPRET against the mode this process's triton was imported in.
    if INTERPRETING:
        monkeypatch.delenv("TRITON_INTERPRET")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"fixes interpreting-or-compiling at import\. Hint: export"):
        select_moe_kernels(torch.device("cuda"), "triton")


def test_without_triton_the_modules_import_and_never_fall_back_silently(monkeypatch: pytest.MonkeyPatch):
    # Fresh copies of the MoE modules on an install without triton; the originals are put back afterwards.
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    for name in ("routing", "experts", "moe_layer"):
        monkeypatch.delitem(sys.modules, f"rmserve_kernels.{name}")
        monkeypatch.setattr(rmserve_kernels, name, getattr(rmserve_kernels, name))
    fresh = importlib.import_module("rmserve_kernels.moe_layer")
    for name in ("routing", "experts"):
        assert importlib.import_module(f"rmserve_kernels.{name}").triton is None
    cuda = torch.device("cuda")
    assert fresh.select_moe_kernels(torch.device("cpu"), "auto") is fresh.REFERENCE_KERNELS
    assert fresh.select_moe_kernels(cuda, "reference") is fresh.REFERENCE_KERNELS
    for kernels in ("auto", "triton"):
        with pytest.raises(ValueError, match=r"pip install 'rmserve\[gpu\]'.*kernels='reference'"):
            fresh.select_moe_kernels(cuda, kernels)
    inputs = make_layer(2, 16, 16, 3, seed=10)
    with pytest.raises(ValueError, match="moe_layer_triton needs Triton, which is not installed"):
        fresh.moe_layer_triton(**inputs)
    assert fresh.moe_layer_reference(**inputs).shape == (2, 16)


# Without a GPU, and unless TRITON_INTERPRET=1 was exported, the kernel_device tests run in a child pytest.
test_kernel_tests_in_the_triton_interpreter = rerun_in_the_interpreter


# --- the kernels against the references (GPU, or Triton's interpreter in float32) --------------------


@pytest.mark.parametrize(
    ("tokens", "hidden", "experts", "top_k"),
    [
        (37, 64, 3, 1),
        (37, 64, 7, 2),
        (37, 64, 15, 3),
        (9, 40, 3, 3),
        (20, 32, MAX_KERNEL_EXPERTS, MAX_KERNEL_TOP_K),
    ],
)
@pytest.mark.parametrize("rule", ["xft", "renorm"])
def test_route_matches_reference(kernel_device, tokens, hidden, experts, top_k, rule):
    # T = 37 is not a multiple of the 16-token block, H = 40 not one of the H block, N-1 = 3, 7, 15 pad
    # to 16 columns; (9, 40, 3, 3) selects every expert.
    inputs = to(kernel_device, make_layer(tokens, hidden, 16, experts, seed=20 + experts))
    x, router_weight = inputs["x"], inputs["router_weight"] * 3  # (T, H), (E, H) peaky and flat rows
    assert_routing_matches(
        route_triton(x, router_weight, top_k, rule), route_reference(x, router_weight, top_k, rule)
    )


def test_route_ties_pick_the_lowest_index(kernel_device):
    # Small integers everywhere: every logit is an exact integer whatever the summation order, so equal
    # router rows (1 and 3; 0 and 4) really tie in both implementations.
    g = torch.Generator().manual_seed(21)
    router_weight = torch.randint(-2, 3, (6, 32), generator=g).float()  # (6, H)
    router_weight[3], router_weight[4] = router_weight[1], router_weight[0]
    x = torch.randint(-1, 2, (48, 32), generator=g).float()  # (T, H)
    x, router_weight = x.to(kernel_device), router_weight.to(kernel_device) * 0.25
    for top_k in (1, 2, 3):
        out = route_triton(x, router_weight, top_k)
        assert_routing_matches(out, route_reference(x, router_weight, top_k))
        index = out.expert_index.cpu()
        for low, high in ((1, 3), (0, 4)):
            has_low, has_high = (index == low).any(dim=1), (index == high).any(dim=1)
            assert not torch.any(has_high & ~has_low)  # the higher of two tied experts never wins alone
            if top_k == 2:
                assert torch.any(has_low & ~has_high)  # and the tie does fall on the cut for some tokens


def test_route_one_token_no_token_and_nan(kernel_device):
    inputs = to(kernel_device, make_layer(4, 64, 16, 7, seed=22))
    x, router_weight = inputs["x"], inputs["router_weight"]
    assert_routing_matches(route_triton(x[:1], router_weight, 2), route_reference(x[:1], router_weight, 2))
    empty = route_triton(x[:0], router_weight, 2)
    assert empty.expert_index.shape == (0, 2) and empty.shared_weight.shape == (0,)
    # A NaN hidden state makes its token's affinities NaN: torch.sort ranks NaN first, so both pick
    # experts 0, 1 with NaN weights; the other tokens are untouched.
    x = x.clone()
    x[2, 5] = math.nan
    out, ref = route_triton(x, router_weight, 2), route_reference(x, router_weight, 2)
    assert_routing_matches(out, ref)
    assert out.expert_index[2].tolist() == [0, 1] and out.shared_weight[2].isnan()


def test_route_beyond_the_kernel_limits_says_what_to_fix():
    x = torch.zeros(2, 16)
    for experts, top_k in ((MAX_KERNEL_EXPERTS + 1, 2), (MAX_KERNEL_TOP_K + 2, MAX_KERNEL_TOP_K + 1)):
        with pytest.raises(
            ValueError, match=r"at most 64 normal experts and top_k <= 8.*kernels='reference'"
        ):
            route_triton(x, torch.zeros(experts, 16), top_k)


@pytest.mark.parametrize(("hidden", "ffn"), [(64, 128), (64, 96), (40, 48)])
def test_grouped_swiglu_matches_reference_with_uneven_groups(kernel_device, hidden, ffn):
    # Expert 0 gets all 37 tokens (3 tiles of 16), expert 2 none; F = 96, 48 and H = 40 are not
    # multiples of their blocks.
    inputs = to(kernel_device, experts_of(make_layer(37, hidden, ffn, 5, seed=23)))
    routing = uneven_routing(37, 5, 2, seed=24, unused=2)
    routing = Routing(*(t.to(kernel_device) for t in routing.__dict__.values()))
    out = grouped_swiglu_triton(**inputs, routing=routing)
    assert out.dtype == torch.float32 and out.shape == (37, hidden)
    assert_outputs_match(out, grouped_swiglu_reference(**inputs, routing=routing))


def test_grouped_swiglu_one_token_and_strided_weights(kernel_device):
    inputs = to(kernel_device, make_layer(6, 64, 96, 7, seed=25))
    x, gate, up, down = experts_of(inputs).values()
    routing = route_reference(x, inputs["router_weight"], 3)
    one = Routing(routing.expert_index[:1], routing.expert_weight[:1], routing.shared_weight[:1])
    assert_outputs_match(
        grouped_swiglu_triton(x[:1], gate, up, down, one),
        grouped_swiglu_reference(x[:1], gate, up, down, one),
    )
    # Column-major expert weights (a transposed checkpoint) and x as a view with row stride 2H.
    gate, up, down = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (gate, up, down))
    x = torch.cat([x, x], dim=1)[:, :64]  # (T, H), strides (2H, 1)
    assert not (x.is_contiguous() or gate.is_contiguous())
    assert_outputs_match(
        grouped_swiglu_triton(x, gate, up, down, routing),
        grouped_swiglu_reference(x, gate, up, down, routing),
    )


@pytest.mark.parametrize(
    ("tokens", "ffn", "experts", "top_k"), [(37, 128, 7, 2), (37, 96, 3, 1), (1, 128, 15, 3), (0, 96, 3, 2)]
)
@pytest.mark.parametrize("rule", ["xft", "renorm"])
def test_moe_layer_matches_reference(kernel_device, tokens, ffn, experts, top_k, rule):
    inputs = to(kernel_device, make_layer(tokens, 64, ffn, experts, seed=26 + experts, top_k=top_k))
    out = moe_layer_triton(**inputs, rule=rule)
    assert out.shape == (tokens, 64) and out.dtype == torch.float32
    assert_outputs_match(out, moe_layer_reference(**inputs, rule=rule))


def test_moe_layer_with_identical_experts_is_the_dense_ffn(kernel_device):
    inputs = to(kernel_device, make_layer(21, 64, 96, 7, seed=27, top_k=2))
    gate, up, down = inputs["shared"]
    inputs.update(gate=gate.expand(7, -1, -1), up=up.expand(7, -1, -1), down=down.expand(7, -1, -1))
    dense = F.silu(inputs["x"] @ gate.T) * (inputs["x"] @ up.T) @ down.T  # (T, H)
    torch.testing.assert_close(moe_layer_triton(**inputs), dense, rtol=1e-5, atol=1e-5)


def test_moe_layer_large_magnitudes(kernel_device):
    # x ~ 30 N(0, 1): gate and up grow 30-fold and their product 900-fold, outputs reach ~1e3. Compared
    # with rtol 1e-5 and atol 1e-5 of the largest output (see assert_outputs_match). The router is scaled
    # down as much, so routing stays as varied as in the other tests.
    inputs = make_layer(19, 64, 96, 5, seed=28, top_k=2)
    inputs["x"] = inputs["x"] * 30
    inputs["router_weight"] = inputs["router_weight"] / 30
    inputs = to(kernel_device, inputs)
    ref = moe_layer_reference(**inputs)
    assert ref.abs().max() > 1e2
    assert_outputs_match(moe_layer_triton(**inputs), ref)


# --- launch configurations (autotune on CUDA, one tile in the interpreter) -----------------------------


@needs_triton
@pytest.mark.parametrize(
    ("space", "names"),
    [("routing._ROUTE_TUNING", {"BLOCK_T", "BLOCK_H"}), ("experts._GROUPED_TUNING", {"BLOCK_F", "BLOCK_H"})],
)
def test_autotune_configs_are_valid(space, names):
    module, name = space.split(".")
    space = getattr(getattr(rmserve_kernels, module), name)
    configs = tuning_configs(space, interpreted=False)
    assert len(configs) == len(space.candidates) >= 4
    for config in configs:
        assert set(config.kwargs) == names
        assert all(size >= MIN_DOT_SIDE and size & (size - 1) == 0 for size in config.kwargs.values())
    [interpreter] = tuning_configs(space, interpreted=True)
    assert set(interpreter.kwargs) == names and min(interpreter.kwargs.values()) >= MIN_DOT_SIDE


@needs_triton
def test_launch_pruning_keeps_the_first_tile_for_every_launch():
    route, grouped = rmserve_kernels.routing._ROUTE_TUNING, rmserve_kernels.experts._GROUPED_TUNING
    for hidden in (1, 16, 40, 576, 4096):
        for experts in (1, 3, 16, 17, MAX_KERNEL_EXPERTS):
            for bucket in (16, 128, 8192):
                launch = {"H": hidden, "E": experts, "T_BUCKET": bucket}
                launch["BLOCK_E"] = max(16, 1 << (experts - 1).bit_length())
                fitting = [t for t in route.candidates if route.fits({**launch, **t.blocks})]
                assert fitting and fitting[0] == route.candidates[0], launch
        for ffn in (1, 16, 48, 1536, 14336):
            for block_m in (16, 32, 64):
                launch = {"H": hidden, "F": ffn, "BLOCK_M": block_m}
                fitting = [t for t in grouped.candidates if grouped.fits({**launch, **t.blocks})]
                assert fitting and fitting[0] == grouped.candidates[0], launch


@needs_triton
def test_kernels_are_autotuned_only_when_compiled():
    routing, experts = rmserve_kernels.routing, rmserve_kernels.experts
    # The activation scratch, like every output, is stored once per launch: no reset between trials.
    assert_autotuned_only_when_compiled(routing._route_tuned, routing._ROUTE_TUNING)
    assert_autotuned_only_when_compiled(experts._grouped_swiglu_tuned, experts._GROUPED_TUNING)


@pytest.mark.parametrize("index", range(len(rmserve_kernels.routing._ROUTE_TUNING.candidates)))
def test_every_routing_candidate_matches_reference(kernel_device, monkeypatch: pytest.MonkeyPatch, index):
    launch_candidate_alone(monkeypatch, rmserve_kernels.routing, "_route_tuned", index)
    # T = 150 is not a multiple of any token tile, H = 200 not one of any hidden tile.
    inputs = to(kernel_device, make_layer(150, 200, 16, 7, seed=60 + index))
    x, router_weight = inputs["x"], inputs["router_weight"] * 3
    assert_routing_matches(route_triton(x, router_weight, 2), route_reference(x, router_weight, 2))


@pytest.mark.parametrize("index", range(len(rmserve_kernels.experts._GROUPED_TUNING.candidates)))
def test_every_grouped_candidate_matches_reference(kernel_device, monkeypatch: pytest.MonkeyPatch, index):
    launch_candidate_alone(monkeypatch, rmserve_kernels.experts, "_grouped_swiglu_tuned", index)
    # F = 100 and H = 72 are multiples of no tile; expert 0 takes every token (two 16-row tiles), expert
    # 2 none.
    inputs = to(kernel_device, experts_of(make_layer(21, 72, 100, 5, seed=70 + index)))
    routing = uneven_routing(21, 5, 2, seed=71, unused=2)
    routing = Routing(*(t.to(kernel_device) for t in routing.__dict__.values()))
    assert_outputs_match(
        grouped_swiglu_triton(**inputs, routing=routing), grouped_swiglu_reference(**inputs, routing=routing)
    )
