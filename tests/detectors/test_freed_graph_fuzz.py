"""Differential test: gradprobe's "this backward will raise" prediction against PyTorch itself."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradprobe

# (name, arity, function): some ops save tensors for backward, some do not
OPS = [
    ("add", 2, lambda x, y: x + y),  # AddBackward0: saves nothing
    ("add_scalar", 1, lambda x: x + 1.5),
    ("neg", 1, lambda x: -x),
    ("clone", 1, lambda x: x.clone()),
    ("view", 1, lambda x: x.view(3)),
    ("mul", 2, lambda x, y: x * y),  # saves both inputs
    ("mul_float", 1, lambda x: x * 2.0),  # saves the wrapped scalar only
    ("sigmoid", 1, torch.sigmoid),  # saves its result
    ("exp", 1, torch.exp),
    ("tanh", 1, torch.tanh),
    ("sin", 1, torch.sin),  # saves its input
]

op_specs = st.lists(
    st.tuples(st.integers(0, len(OPS) - 1), st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=8
)
action = st.one_of(
    st.tuples(st.just("backward"), st.integers(0, 10**6), st.booleans(), st.sampled_from(["none", "leaf", "node"])),
    st.tuples(st.just("grad"), st.integers(0, 10**6), st.booleans(), st.sampled_from(["leaf", "node"])),
    st.tuples(st.just("step"), st.integers(0, 10**6), st.booleans(), st.just("none")),
)
scenario = st.tuples(
    op_specs,
    st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["sum", "mean"])), min_size=1, max_size=3),
    st.lists(action, min_size=1, max_size=6),
)


def execute(ops, roots_spec, actions, detect=None):
    """Run one scenario, traced with ``detect`` (None: untraced); outcomes, final grads, findings per action."""
    torch.manual_seed(0)
    leaves = [torch.rand(3, requires_grad=True) for _ in range(3)]
    outcomes, predictions = [], []
    context = gradprobe.trace(*leaves, on_finding="record", detect=detect) if detect is not None else None
    t = context.__enter__() if context is not None else None
    try:
        values = list(leaves)
        for op_index, i, j in ops:
            _, arity, fn = OPS[op_index]
            args = [values[i % len(values)], values[j % len(values)]][:arity]
            values.append(fn(*args))
        inner = values[len(leaves):]
        roots = [getattr(values[len(leaves) + k % len(inner)], how)() for k, how in roots_spec]
        for kind, k, retain, target in actions:
            if kind == "step":
                with torch.no_grad():
                    leaves[k % 3].add_(0.1)
                continue
            root = roots[k % len(roots)]
            inputs = None
            if target == "leaf":
                inputs = [leaves[k % 3]]
            elif target == "node":
                inputs = [inner[k % len(inner)]]
            before = len(t.findings) if t is not None else 0
            try:
                if kind == "grad":
                    torch.autograd.grad(root, inputs, retain_graph=retain, allow_unused=True)
                else:
                    root.backward(inputs=inputs, retain_graph=retain)
                outcomes.append(None)
            except RuntimeError as exc:
                outcomes.append("freed" if "second time" in str(exc) else "inplace" if "inplace" in str(exc) else "other")
            predictions.append({f.code for f in t.findings[before:]} if t is not None else set())
    finally:
        if context is not None:
            context.__exit__(None, None, None)
    return outcomes, [leaf.grad for leaf in leaves], predictions


def run_scenario(ops, roots_spec, actions) -> None:
    plain, plain_grads, _ = execute(ops, roots_spec, actions)
    for detect in ("default", "all"):
        outcomes, grads, predictions = execute(ops, roots_spec, actions, detect)
        # gradprobe changes nothing: same errors and bitwise identical gradients
        assert outcomes == plain, (detect, outcomes, plain)
        for g, p in zip(grads, plain_grads):
            assert (g is None and p is None) or (g is not None and p is not None and torch.equal(g, p))
        # "will raise" (GP101 freed graph, GP302 in-place write) predicted exactly when PyTorch raises
        for predicted, outcome in zip(predictions, outcomes):
            assert not (predicted & {"GP101", "GP302"} and outcome is None), (detect, predictions, outcomes)
            assert not (outcome == "freed" and "GP101" not in predicted), (detect, predictions, outcomes)
            assert not (outcome == "inplace" and "GP302" not in predicted), (detect, predictions, outcomes)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario)
def test_prediction_matches_pytorch(case) -> None:
    """Every predicted GP101 / GP302 is followed by a PyTorch error, every freed-graph and in-place error
    was predicted, and tracing (default or every detector) changes neither the errors nor the gradients."""
    run_scenario(*case)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario)
def test_prediction_matches_pytorch_many(case) -> None:
    """The same differential test, thousands of examples."""
    run_scenario(*case)
