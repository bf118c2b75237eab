"""The trace's hot path: deferred statistics, batched read-back, threads, memory, and the GPU rules.

The oracle is PyTorch itself: a part's statistics must equal those of the gradient autograd gives for
that loss alone (``torch.autograd.grad``), computed with the same reductions, bit for bit on the CPU.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradprobe
from models import MLP, TinyTransformer


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float32))


def _absmax(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, ord=float("inf"), dtype=torch.float32))


def _two_losses(model: nn.Module, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(torch.randn(5, 8, device=device))
    return out.square().mean(), out[:, :2].sum()


def test_first_part_stats_equal_the_gradient_autograd_gives(device: str) -> None:
    """A part that opens `.grad` (measured late, from `.grad`) has the norm and abs-max of that loss's gradient."""
    model = MLP().to(device)
    l1, l2 = _two_losses(model, device)
    oracle = [torch.autograd.grad(loss, list(model.parameters()), retain_graph=True) for loss in (l1, l2)]
    with gradprobe.trace(model) as t:
        l1.backward(retain_graph=True)
        l2.backward()
    for row, g1, g2 in zip(t.breakdown(), *oracle):
        first, second = row.parts
        assert first.norm == _norm(g1) and first.absmax == _absmax(g1)
        assert second.norm == _norm(g2) and second.absmax == _absmax(g2)
        assert row.grad_norm == pytest.approx(_norm(g1 + g2), rel=1e-5)
        assert row.check is True


def test_stats_mode_agrees_with_tensors_mode(device: str) -> None:
    """keep="stats" (deferred, batched) and keep="tensors" (measured in the hook) report the same numbers."""
    rows = {}
    for keep in ("stats", "tensors"):
        torch.manual_seed(0)
        model = TinyTransformer().to(device)
        tokens = torch.randint(0, 20, (3, 6), device=device)
        with gradprobe.trace(model, keep=keep) as t:
            lm, cls = model(tokens)
            lm.square().mean().backward(retain_graph=True)
            cls.sum().backward()
        rows[keep] = t.breakdown()
    for s, k in zip(rows["stats"], rows["tensors"]):
        assert [(p.norm, p.absmax, p.finite, p.in_grad) for p in s.parts] == [
            (p.norm, p.absmax, p.finite, p.in_grad) for p in k.parts
        ]
        assert s.grad_norm == k.grad_norm
        for ps, pk in zip(s.parts, k.parts):
            assert ps.share == pytest.approx(pk.share, abs=1e-4)
            assert (ps.cos_before is None) == (pk.cos_before is None)
        assert k.check is True


def test_traced_gradients_are_bitwise_identical_and_stolen() -> None:
    """Tracing changes no gradient, and AccumulateGrad still steals the part (no extra copy is held)."""
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 8)
    model(x).pow(2).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    seen: dict[int, int] = {}
    for p in model.parameters():  # registered before the trace's: sees the same tensor AccumulateGrad gets
        p.register_hook(lambda g, p=p: seen.__setitem__(id(p), g.data_ptr()))
    with gradprobe.trace(model):
        model(x).pow(2).sum().backward()
    for p, g in zip(model.parameters(), plain):
        assert torch.equal(p.grad, g)
        assert p.grad.data_ptr() == seen[id(p)]


def test_user_post_accumulate_hook_that_frees_grad() -> None:
    """An optimizer-in-backward hook that sets `.grad = None` does not lose the part's statistics."""
    model = MLP()
    x = torch.randn(4, 8)
    expected = torch.autograd.grad(model(x).sum(), list(model.parameters()))

    def step_and_free(p: torch.Tensor) -> None:
        p.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_and_free)
    with gradprobe.trace(model) as t:
        model(x).sum().backward()
    for row, g in zip(t.breakdown(), expected):
        assert row.parts[0].norm == _norm(g)
        assert row.grad_norm is None


def test_hook_registered_after_the_trace_that_frees_grad() -> None:
    """A post-accumulate hook added inside the trace (after its own) is seen at the next part too."""
    model = MLP()
    x = torch.randn(4, 8)
    expected = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    with gradprobe.trace(model) as t:
        handles = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in model.parameters()]
        model(x).sum().backward()
        for h in handles:
            h.remove()
    for row, g in zip(t.breakdown(), expected):
        assert row.parts[0].norm == _norm(g)
        assert row.parts[0].finite


def test_reentrant_checkpoint_with_a_shared_layer() -> None:
    """Two nested backwards reaching one leaf inside one traced call: both parts measured exactly."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 6)
    x = torch.randn(3, 6, requires_grad=True)

    def run() -> torch.Tensor:
        h = checkpoint(layer, x, use_reentrant=True)
        return checkpoint(layer, h.tanh(), use_reentrant=True).sum()

    run().backward()
    expected = layer.weight.grad
    layer.zero_grad()
    with gradprobe.trace(layer, keep="stats") as t:
        run().backward()
    row = t.breakdown()[0]
    assert [p.record for p in row.parts] == [0, 0]
    assert row.check is True
    assert row.grad_norm == pytest.approx(_norm(expected), rel=1e-6)
    assert torch.equal(layer.weight.grad, expected)


def test_backward_from_another_thread_is_recorded_unseen_and_attributed() -> None:
    """A backward started on a thread the interceptor cannot see gets its own record (seen=False)."""
    model = MLP()
    x = torch.randn(4, 8)
    expected = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    with gradprobe.trace(model) as t:
        loss = model(x).sum()
        worker = threading.Thread(target=loss.backward, name="worker")
        worker.start()
        worker.join()
        model(x).mean().backward()
    first, second = t.records
    assert first.seen is False and first.thread == "worker"
    assert second.seen is True
    for row, g in zip(t.breakdown(), expected):
        assert [p.record for p in row.parts] == [0, 1]
        assert row.parts[0].norm == _norm(g)
        assert row.check is True


def test_no_gradient_outlives_the_trace() -> None:
    """After exit nothing of the trace keeps a `.grad` (or a part) alive."""
    model = MLP()
    with gradprobe.trace(model) as t:
        model(torch.randn(4, 8)).sum().backward()
    refs = [weakref.ref(p.grad) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)
    row = t.breakdown()[0]  # numbers come from the snapshot taken at exit
    assert row.grad_norm == row.parts[0].norm > 0


def _peak_extra_bytes(model: nn.Module, step: object) -> int:
    """Peak bytes allocated during ``step`` beyond what was alive before it (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)  # frees of blocks seen by an earlier profile would count as negative
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()  # type: ignore[operator]
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("keep", ["stats", "tensors"])
def test_stats_mode_peak_memory_is_that_of_the_untraced_step(keep: str) -> None:
    """keep="stats" holds no gradient (a few bytes per leaf at most); keep="tensors" holds every part."""
    model = nn.Sequential(*(nn.Linear(256, 256) for _ in range(6)))
    x = torch.randn(32, 256)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def step() -> None:
        model(x).square().mean().backward()

    def traced() -> None:
        with gradprobe.trace(model, keep=keep):
            step()

    step(), traced()
    plain, with_trace = _peak_extra_bytes(model, step), _peak_extra_bytes(model, traced)
    assert plain >= grad_bytes
    if keep == "stats":
        assert with_trace <= plain + 1024 * len(list(model.parameters())), (plain, with_trace)
    else:  # the oracle that the measurement can see a held gradient
        assert with_trace >= plain + grad_bytes, (plain, with_trace)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_device_sync_inside_a_traced_step() -> None:
    """With CUDA, a traced step (hooks, deferred stats, end-of-backward flush) never syncs with the host."""
    model = TinyTransformer().cuda()
    tokens = torch.randint(0, 20, (3, 6), device="cuda")
    with gradprobe.trace(model) as t:
        lm, cls = model(tokens)
        l1, l2 = lm.square().mean(), cls.sum()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            l1.backward(retain_graph=True)
            l2.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(row.check for row in t.breakdown() if row.parts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hooks_on_the_cuda_device_thread_are_attributed_to_the_call() -> None:
    """On CUDA the engine runs hooks on its device thread: they still land in the caller's record."""
    model = MLP().cuda()
    x = torch.randn(4, 8, device="cuda")
    hook_threads: set[int] = set()
    model.fc1.weight.register_hook(lambda g: hook_threads.add(threading.get_ident()))
    with gradprobe.trace(model) as t:
        model(x).sum().backward()
        model(x).mean().backward()
    assert threading.get_ident() not in hook_threads  # the premise: hooks ran on the engine's device thread
    assert [r.seen for r in t.records] == [True, True]
    for row in t.breakdown():
        assert [p.record for p in row.parts] == [0, 1]
        assert row.check is True


@pytest.mark.parametrize("poison", [None, float("nan"), float("-inf")])
def test_abs_max_of_large_parts_is_exact(device: str, poison: float | None) -> None:
    """Large gradients take the aminmax path on the CPU: same bits as vector_norm(inf), NaN/Inf included."""
    layer = nn.Linear(64, 64, bias=False).to(device)  # 4,096 elements: past the small-tensor path
    x = torch.randn(3, 64, device=device)
    scale = torch.ones(64, device=device)
    if poison is not None:
        scale[5] = poison

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        out = layer(x)
        return -(out * scale).sum(), out.square().mean()

    oracle = torch.autograd.grad(losses()[0], layer.weight), torch.autograd.grad(losses()[1], layer.weight)
    with gradprobe.trace(layer, on_finding="record") as t:
        l1, l2 = losses()
        l1.backward(retain_graph=True)  # opens .grad: measured late, from .grad
        l2.backward()  # adds to .grad: measured in the hook
    first, second = t.breakdown()[0].parts
    for part, (g,) in zip((first, second), oracle):
        expected = float(torch.linalg.vector_norm(g, ord=float("inf"), dtype=torch.float32))
        assert part.absmax == expected or (part.absmax != part.absmax and expected != expected)
        assert part.finite == bool(torch.isfinite(g).all())


def _hook_count(model: nn.Module) -> int:
    return sum(len(p._backward_hooks or {}) + len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())


def test_a_trace_never_entered_leaves_no_hooks() -> None:
    """Hooks go on at __enter__: a trace built and dropped (or failing to build) costs nothing later."""
    model = MLP()
    gradprobe.trace(model)
    assert _hook_count(model) == 0
    with pytest.raises(ValueError):
        gradprobe.trace(model, disable=["no-such-plugin"])
    assert _hook_count(model) == 0
    with gradprobe.trace(model) as t:
        assert _hook_count(model) == 2 * len(list(model.parameters()))
        model(torch.randn(2, 8)).sum().backward()
    assert _hook_count(model) == 0
    assert all(row.parts for row in t.breakdown())


def test_stacked_statistics_equal_pytorchs_own_norms() -> None:
    """Small same-shaped gradients are measured stacked (NOTE [batched statistics]); each part still
    has bitwise the norm and abs-max PyTorch gives that gradient alone, next to large ones measured
    one by one and a float64 leaf."""
    torch.manual_seed(0)
    small = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
    big = nn.Linear(300, 300)  # 90,000 elements: the per-tensor path
    w64 = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 8)
    with gradprobe.trace(small, big, w64) as t:
        h = x
        for layer in small:
            h = torch.tanh(layer(h))
        loss = h.square().sum() + big(torch.randn(2, 300)).pow(3).mean() + (w64 * 3).sin().sum()
        loss.backward()
    rows = {row.leaf.name: row for row in t.breakdown()}
    params = [(n, p) for n, p in small.named_parameters()] + [(n, p) for n, p in big.named_parameters()]
    assert len(rows) == len(params) + 1
    for tensor in [p for _, p in params] + [w64]:
        (row,) = [r for r in rows.values() if r.leaf.tensor is tensor]
        (part,) = row.parts
        acc = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        assert part.norm == float(torch.linalg.vector_norm(tensor.grad, dtype=acc))
        assert part.absmax == float(torch.linalg.vector_norm(tensor.grad, ord=float("inf"), dtype=acc))
        assert row.check is True
    batched = {state.leaf.name: state.parts[0].batch is not None for state in t._ledger.leaves}
    # the 12 same-shaped small tensors are stacked; the large weight and the shapes held by one
    # tensor only (big.bias, the float64 leaf) go through the fused per-tensor call
    assert sorted(name for name, b in batched.items() if not b) == sorted(["big.weight", "big.bias", "w64"])


def test_read_floats_mixes_scalars_and_batch_rows() -> None:
    from gradprobe.ledger.stats import read_floats

    batch = torch.tensor([1.5, 2.5, 3.5])
    other = torch.tensor([7.0, 8.0], dtype=torch.float64)
    items = [torch.tensor(0.25), (batch, 2), (other, 0), torch.tensor(9.0, dtype=torch.float64), (batch, 0)]
    assert read_floats(items) == [0.25, 3.5, 7.0, 9.0, 1.5]


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_left_as_it_was(enabled: bool) -> None:
    """gradprobe pauses the collector only during its own bulk steps (NOTE [no collections while hooking])."""
    model = MLP()
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with gradprobe.trace(model):
            assert gc.isenabled() is enabled
            model(torch.randn(3, 8)).sum().backward()
            assert gc.isenabled() is enabled
        assert gc.isenabled() is enabled
        with pytest.raises(ZeroDivisionError), gradprobe.trace(model):
            1 / 0
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_empty_leaves_are_measured_in_a_batch_too() -> None:
    """Zero-element gradients of one shape stack into a (k, 0) batch: norm 0, Σ check holds."""
    a, b = (torch.zeros(0, 5, requires_grad=True) for _ in range(2))
    w = torch.randn(3, requires_grad=True)
    with gradprobe.trace(a, b, w) as t:
        (a.sum() + b.sum() + w.square().sum()).backward()
    rows = t.breakdown()
    assert [[p.norm for p in r.parts] for r in rows[:2]] == [[0.0], [0.0]]
    assert rows[2].parts[0].norm == float(torch.linalg.vector_norm(w.grad))
    assert all(r.check is True for r in rows)
