"""The trace core: exact per-backward parts, records, and never changing results."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn

import gradprobe
from models import MLP, MultiTask, TinyFPNDetector, TinyLSTM, TinyTransformer


def _notebook_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = torch.rand(1, 4, requires_grad=True)
    c = (a**2) * 2
    return a, c.mean(), c.sum()


@pytest.mark.parametrize("keep", ["stats", "tensors"])
def test_notebook_case_parts_and_shares(keep: str) -> None:
    """d gives a its own value, e gives 4a: shares 20% / 80%, summing exactly to .grad."""
    a, d, e = _notebook_tensors()
    with gradprobe.trace(a, keep=keep) as t:
        d.backward(retain_graph=True)
        e.backward()
    (row,) = t.breakdown()
    p0, p1 = row.parts
    assert [r.name for r in t.records] == ["d", "e"]
    assert p0.share == pytest.approx(0.2, abs=1e-5)
    assert p1.share == pytest.approx(0.8, abs=1e-5)
    assert p0.norm == pytest.approx(a.detach().norm().item(), rel=1e-5)
    assert p1.norm == pytest.approx(4 * a.detach().norm().item(), rel=1e-5)
    assert p1.cos_before == pytest.approx(1.0, abs=1e-5)
    assert row.check is True
    assert row.grad_norm == pytest.approx(a.grad.norm().item(), rel=1e-6)
    if keep == "tensors":
        assert torch.equal(p0.tensor, a.detach())
        assert torch.allclose(p1.tensor, 4 * a.detach())


@pytest.mark.parametrize("pre_existing", [False, True])
def test_tensor_parts_sum_bitwise_to_grad(pre_existing: bool) -> None:
    """keep="tensors": carried-in + parts, summed in call order, torch.equal the final .grad."""
    model = TinyFPNDetector()
    x = torch.randn(2, 3, 8, 8)
    if pre_existing:
        sum(model.losses(x).values()).backward()  # type: ignore[union-attr]
    with gradprobe.trace(model, keep="tensors", on_finding="record") as t:
        losses = model.losses(x)
        losses["cls"].backward(retain_graph=True)
        losses["box"].backward()
    assert ("GP402" in [f.code for f in t.findings]) == pre_existing  # .grad non-zero at the start
    rows = t.breakdown()
    assert rows and all(row.check is True for row in rows)
    for row, (name, p) in zip(rows, model.named_parameters()):
        assert row.leaf.name == f"model.{name}"  # NOTE [leaf names]: under the variable
        total = None
        if pre_existing:
            assert row.carried_in is not None and row.carried_in.reason == "trace_start"
        for part in row.parts:
            assert part.tensor is not None
        start = t._ledger.leaves[row.leaf.index].epochs[-1].tensor
        total = start.clone() if start is not None else None
        for part in row.parts:
            total = part.tensor.clone() if total is None else total + part.tensor
        assert torch.equal(total, p.grad), name


def _step(model: nn.Module, x: torch.Tensor, mode: str) -> None:
    if isinstance(model, TinyFPNDetector):
        losses = model.losses(x)
        losses["cls"].backward(retain_graph=True)
        losses["box"].backward()
    elif isinstance(model, TinyLSTM):
        out, _ = model(x)
        out.pow(2).mean().backward()
    elif isinstance(model, TinyTransformer):
        lm, cls = model(x)
        lm.logsumexp(-1).mean().backward(retain_graph=True)
        cls.square().mean().backward()
    elif isinstance(model, MultiTask):
        out = model(x)
        (out["a"].pow(2).mean() + out["b"].abs().mean()).backward()
    else:
        model(x).pow(2).sum().backward()


def _model_and_input(kind: str) -> tuple[nn.Module, torch.Tensor]:
    if kind == "mlp":
        return MLP(), torch.randn(5, 8)
    if kind == "fpn":
        return TinyFPNDetector(), torch.randn(2, 3, 8, 8)
    if kind == "lstm":
        return TinyLSTM(), torch.randn(3, 4, 5)
    if kind == "transformer":
        return TinyTransformer(), torch.randint(0, 20, (2, 6))
    return MultiTask(), torch.randn(4, 6)


@pytest.mark.parametrize("keep", ["stats", "tensors"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["mlp", "fpn", "lstm", "transformer", "multitask"])
def test_tracing_never_changes_gradients(kind: str, seed: int, keep: str) -> None:
    """Gradients are bitwise identical with and without the trace, on several models and seeds."""
    torch.manual_seed(seed)
    model, x = _model_and_input(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, x, "plain")
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    with gradprobe.trace(model, keep=keep) as t:
        _step(model, x, "traced")
    traced = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert plain.keys() == traced.keys()
    for name in plain:
        assert torch.equal(plain[name], traced[name]), name
    assert all(row.check is not False for row in t.breakdown())


def test_two_backward_calls_equal_summed_loss() -> None:
    """l1.backward(retain_graph=True); l2.backward() matches (l1 + l2).backward(): two parts vs one."""
    model = TinyFPNDetector()
    x = torch.randn(2, 3, 8, 8)
    with gradprobe.trace(model) as separate:
        losses = model.losses(x)
        losses["cls"].backward(retain_graph=True)
        losses["box"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with gradprobe.trace(model) as summed:
        losses = model.losses(x)
        (losses["cls"] + losses["box"]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)
    assert len(separate.records) == 2 and len(summed.records) == 1
    trunk = next(r for r in separate.breakdown() if r.leaf.name == "model.stem.0.weight")
    assert len(trunk.parts) == 2
    assert sum(p.share for p in trunk.parts) == pytest.approx(1.0, abs=1e-5)
    head = next(r for r in separate.breakdown() if r.leaf.name == "model.cls_head.weight")
    assert [p.record for p in head.parts] == [0], "the box loss never reaches the class head"
    assert summed.records[0].name == 'losses["cls"] + losses["box"]'


def test_record_fields() -> None:
    """Records carry name, site, effective retain_graph and kind."""
    w = torch.randn(3, requires_grad=True)
    loss_a = (w * 2).sum()
    with gradprobe.trace(w) as t:
        loss_a.backward(retain_graph=True)
        t.name(loss_a, "named")
        loss_a.backward(retain_graph=True)
        (g,) = torch.autograd.grad(loss_a, [w], create_graph=True)
        torch.autograd.backward([loss_a, (w**2).sum()])
    r0, r1, r2, r3 = t.records
    assert (r0.name, r0.retain_graph, r0.kind) == ("loss_a", True, "backward")
    assert r0.site is not None and r0.site.filename == __file__
    assert "loss_a.backward(retain_graph=True)" in r0.site.source
    assert r1.name == "named"
    assert (r2.kind, r2.retain_graph, r2.create_graph) == ("grad", True, True)
    assert r3.name == "[named, ?]" and r3.retain_graph is False
    (row,) = t.breakdown()
    assert [p.in_grad for p in row.parts] == [True, True, False, True]
    assert torch.equal(g, torch.full((3,), 2.0))


def test_autograd_grad_does_not_count_towards_grad() -> None:
    """autograd.grad is recorded as a call whose part is not in .grad."""
    w = torch.randn(4, requires_grad=True)
    loss = (w**2).sum()
    with gradprobe.trace(w) as t:
        torch.autograd.grad(loss, w, retain_graph=True)
        loss.backward()
    (row,) = t.breakdown()
    assert [p.in_grad for p in row.parts] == [False, True]
    assert row.parts[1].share == pytest.approx(1.0)
    assert row.check is True


def test_inputs_restricts_parts() -> None:
    """backward(inputs=[...]) adds parts only to the inputs; the others are not reached."""
    model = MLP()
    x = torch.randn(3, 8)
    with gradprobe.trace(model, on_finding="record") as t:
        loss = model(x).sum()
        loss.backward(inputs=[model.fc2.weight])
    assert t.records[0].inputs == ("model.fc2.weight",)
    assert t.findings == []  # leaving parameters out with inputs= is deliberate, not "unreached"
    reached = {row.leaf.name for row in t.breakdown() if row.reached}
    assert reached == {"model.fc2.weight"}


def test_backward_from_another_thread_is_recorded() -> None:
    """A backward started on a thread the mode cannot see still gets its own record and parts."""
    w = torch.randn(5, requires_grad=True)
    loss_main = (w * 3).sum()
    loss_thread = (w**2).sum()
    with gradprobe.trace(w) as t:
        loss_main.backward()
        worker = threading.Thread(target=lambda: loss_thread.backward(), name="worker")
        worker.start()
        worker.join()
    assert len(t.records) == 2
    assert t.records[0].seen and not t.records[1].seen
    assert t.records[1].thread == "worker"
    (row,) = t.breakdown()
    assert [p.record for p in row.parts] == [0, 1]
    assert row.parts[1].norm == pytest.approx((2 * w.detach()).norm().item(), rel=1e-5)
    assert row.check is True


def test_zero_grad_between_backwards_starts_a_new_epoch() -> None:
    """Parts before zero_grad() are not part of the final .grad."""
    model = MLP()
    x = torch.randn(3, 8)
    with gradprobe.trace(model) as t:
        model(x).sum().backward()
        model.zero_grad()
        model(x).pow(2).sum().backward()
    for row in t.breakdown():
        assert [p.in_grad for p in row.parts] == [False, True]
        assert row.parts[1].share == pytest.approx(1.0)
        assert row.check is True


def test_grad_modified_outside_backward_fails_the_check() -> None:
    """Clipping .grad in place inside the trace shows as a failed check with a note."""
    model = MLP()
    with gradprobe.trace(model) as t:
        model(torch.randn(3, 8)).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    rows = t.breakdown()
    assert all(row.check is False for row in rows)
    assert "modified outside backward" in rows[0].note


def test_clipping_then_another_backward_carries_the_clipped_grad_in() -> None:
    """After an in-place change, the next part starts an epoch whose carried-in value is the clipped .grad."""
    w = torch.ones(3, requires_grad=True)
    with gradprobe.trace(w) as t:
        (w * 4).sum().backward()
        w.grad.mul_(0.5)
        (w * 1).sum().backward()
    (row,) = t.breakdown()
    assert row.check is True
    assert row.carried_in is not None and row.carried_in.reason == "modified"
    assert row.carried_in.norm == pytest.approx(2 * 3**0.5)
    assert row.carried_in.share == pytest.approx(2 / 3)
    assert row.parts[1].share == pytest.approx(1 / 3)
    assert not row.parts[0].in_grad


def test_three_parts_need_keep_tensors_for_shares() -> None:
    """In stats mode, a .grad made of 3 parts has no exact shares; keep="tensors" has them."""
    w = torch.randn(4, requires_grad=True)
    losses = [(w * k).sum() for k in (1.0, 2.0, 3.0)]
    with gradprobe.trace(w) as stats:
        for loss in losses:
            loss.backward(retain_graph=True)
    (row,) = stats.breakdown()
    assert all(p.share is None for p in row.parts)
    assert "keep='tensors'" in row.note
    w.grad = None
    with gradprobe.trace(w, keep="tensors") as exact:
        for loss in losses:
            loss.backward(retain_graph=True)
    (row,) = exact.breakdown()
    assert [p.share for p in row.parts] == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_trace_every_leaf_names_from_the_callers_frame() -> None:
    """trace() with no targets records every leaf a backward reaches, named like the user's variables."""
    model = MLP()
    bias = torch.zeros(4, requires_grad=True)
    with gradprobe.trace() as t:
        (model(torch.randn(2, 8)) + bias).sum().backward()
    names = [leaf.name for leaf in t.leaves]
    assert names == ["model.fc1.weight", "model.fc1.bias", "model.fc2.weight", "model.fc2.bias", "bias"]
    assert t.leaves[0].module == "model.fc1"


def test_nested_traces_on_the_same_module() -> None:
    """Two nested traces of one module both record the same exact parts."""
    model = MLP()
    with gradprobe.trace(model) as outer:
        with gradprobe.trace(model) as inner:
            model(torch.randn(2, 8)).sum().backward()
    assert len(outer.records) == len(inner.records) == 1
    for a, b in zip(outer.breakdown(), inner.breakdown()):
        assert a.parts[0].norm == b.parts[0].norm


def test_sparse_embedding_gradients() -> None:
    """Sparse gradients (nn.Embedding(sparse=True)) are recorded too."""
    emb = nn.Embedding(10, 3, sparse=True)
    with gradprobe.trace(emb) as t:
        emb(torch.tensor([1, 2, 1])).sum().backward()
        emb(torch.tensor([3])).sum().backward()
    (row,) = t.breakdown()
    assert len(row.parts) == 2 and row.check is True
    assert row.parts[0].norm == pytest.approx(torch.tensor([2.0] * 3 + [1.0] * 3).norm().item())


def test_to_dict_is_strict_json() -> None:
    """to_dict() is JSON-safe, non-finite numbers included."""
    w = torch.randn(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        (w * float("nan")).sum().backward()
    data = t.to_dict()
    assert [f["code"] for f in data["findings"]] == ["GP601"]
    text = json.dumps(data, allow_nan=False)
    assert '"nan"' in text
    assert data["records"][0]["name"] == '(w * float("nan")).sum()'
    assert data["breakdown"][0]["parts"][0]["finite"] is False


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")
def test_retain_graph_none_follows_create_graph() -> None:
    """retain_graph=None means create_graph, as in PyTorch."""
    w = torch.randn(3, requires_grad=True)
    with gradprobe.trace(w) as t:
        (w**3).sum().backward(create_graph=True)
    assert t.records[0].retain_graph is True
    w.grad = None


def test_a_leaf_freed_inside_the_trace_is_reported_as_freed() -> None:
    """A parameter garbage collected before exit is not mistaken for a .grad reset to None."""
    with gradprobe.trace() as t:
        model = MLP()
        model(torch.randn(2, 8)).sum().backward()
        del model
    (row, *_) = t.breakdown()
    assert row.reached and row.check is None
    assert "freed before the trace ended" in row.note
