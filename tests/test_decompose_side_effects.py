"""decompose=True never changes the user's program: gradients, RNG stream, hook calls, custom Functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(6, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 2)



@pytest.fixture(autouse=True)
def _fresh_graph_cache():
    """Each test starts as a fresh process would: no graph of it decomposed (and checked) before."""
    from gradprobe.analysis import strategy

    strategy._GRAPHS.clear()
    yield
    strategy._GRAPHS.clear()

def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(step, traced: bool, seed: int = 3):
    """One step (forward + combined backward) untraced or under decompose=True; .grad, RNG state after, trace."""
    model = _Net()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    t = None
    if traced:
        with gradprobe.trace(model, decompose=True, on_finding="record") as t:
            step(model, x)
    else:
        step(model, x)
    return _grads(model), torch.get_rng_state(), t


def _same(step, reset=None):
    """Untraced and traced runs (``reset()`` before each) give the same .grad and RNG state."""
    if reset:
        reset()
    plain, rng_plain, _ = _run(step, traced=False)
    if reset:
        reset()
    traced, rng_traced, t = _run(step, traced=True)
    assert plain.keys() == traced.keys()
    for name in plain:
        assert torch.equal(plain[name], traced[name]), name
    assert torch.equal(rng_plain, rng_traced), "the RNG stream after the step differs"
    return t


def _skipped(t) -> list[gradprobe.Finding]:
    return [f for f in t.findings if f.code == "GP410"]


class Stateful(torch.autograd.Function):
    """Each backward scales by how many backwards ran before: running it twice changes the gradient."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        Stateful.calls += 1
        return g * Stateful.calls


def test_stateful_function_is_not_run_twice():
    """A custom Function with state: not split (GP410 names it and its line), .grad bitwise untraced."""

    def step(model, x):
        h = Stateful.apply(model.trunk(x))
        (F.mse_loss(model.a(h), torch.zeros(4, 3)) + F.l1_loss(model.b(h), torch.ones(4, 2))).backward()

    t = _same(step, reset=lambda: setattr(Stateful, "calls", 0))
    assert Stateful.calls == 1  # the traced step ran it once, as the untraced one
    (finding,) = _skipped(t)
    assert finding.severity == "info" and "Stateful" in finding.message and "test_decompose_side_effects.py:" in finding.message
    assert "gradprobe_pure_backward" in finding.message
    assert [s for s in t.splits() if s.kind == "decomposed"] == []


class FreesCtx(torch.autograd.Function):
    """Frees its saved buffer in backward: a second backward would raise TypeError."""

    @staticmethod
    def forward(ctx, x):
        ctx.buf = x.detach() * 2
        return x * 2

    @staticmethod
    def backward(ctx, g):
        buf = ctx.buf
        ctx.buf = None
        return g * buf.sign() * 2


def test_ctx_freeing_function_never_crashes_the_users_backward():
    """A Function that frees ctx in backward: the user's backward runs and .grad is bitwise untraced."""

    def step(model, x):
        h = FreesCtx.apply(model.trunk(x))
        (F.mse_loss(model.a(h), torch.zeros(4, 3)) + F.l1_loss(model.b(h), torch.ones(4, 2))).backward()

    t = _same(step)
    (finding,) = _skipped(t)
    assert "FreesCtx" in finding.message


class NoisyPure(torch.autograd.Function):
    """Declared pure, but its backward draws random numbers (stochastic rounding, say)."""

    gradprobe_pure_backward = True

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g + 1e-3 * torch.randn_like(g)


def test_rng_drawing_backward_keeps_the_users_stream():
    """The passes run a backward that draws random numbers, under fork_rng: the stream and .grad are untouched."""

    def step(model, x):
        h = NoisyPure.apply(model.trunk(x))
        (F.mse_loss(model.a(h), torch.zeros(4, 3)) + F.l1_loss(model.b(h), torch.ones(4, 2))).backward()
        torch.rand(3)  # the user's next draw

    t = _same(step)
    assert not _skipped(t)
    (split,) = [s for s in t.splits() if s.kind == "decomposed"]
    assert split.leaf("a.weight").reached == (True, False)  # really split: the passes ran the Function


def test_user_tensor_hooks_run_once():
    """Hooks on an intermediate tensor and on a parameter fire once per backward, as untraced."""
    counts = {"h": 0, "w": 0}

    def on_h(g):
        counts["h"] += 1
        torch.randn(2)  # a hook that draws: the stream must not move either

    def on_w(g):
        counts["w"] += 1

    def step(model, x):
        handle = model.trunk.weight.register_hook(on_w)
        h = torch.relu(model.trunk(x))
        h.register_hook(on_h)
        (F.mse_loss(model.a(h), torch.zeros(4, 3)) + F.l1_loss(model.b(h), torch.ones(4, 2))).backward()
        handle.remove()

    t = _same(step, reset=lambda: counts.update(h=0, w=0))
    assert counts == {"h": 1, "w": 1}  # the traced step fired each once, as the untraced one
    (split,) = [s for s in t.splits() if s.kind == "decomposed"]
    assert split.check is True and split.derived is None
    note = " ".join(split.notes)
    assert "on_h" in note and "on_w" in note and "not run in gradprobe's extra passes" in note


def test_gradient_changing_hook_shows_in_the_check():
    """A hook that scales the gradient is not run in the passes; the Σ check says the parts miss it."""

    def step(model, x):
        h = torch.relu(model.trunk(x))
        h.register_hook(lambda g: g * 3)
        (F.mse_loss(model.a(h), torch.zeros(4, 3)) + F.l1_loss(model.b(h), torch.ones(4, 2))).backward()

    t = _same(step)
    (split,) = [s for s in t.splits() if s.kind == "decomposed"]
    assert split.leaf("trunk.weight").check is False
    assert split.leaf("a.weight").check is True


def test_retained_grad_is_as_untraced():
    """retain_grad() tensors get exactly the .grad of the user's backward, not the passes' too."""
    kept = {}

    def step(model, x):
        h = model.trunk(x)
        h.retain_grad()
        (F.mse_loss(model.a(h), torch.zeros(4, 3)) + F.l1_loss(model.b(h), torch.ones(4, 2))).backward()
        kept["h"] = h.grad.clone()

    _run(step, traced=False)
    plain = kept.pop("h")
    _same(step)
    assert torch.equal(kept["h"], plain)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_module_backward_hook_is_not_run_again():
    """A module full backward hook fires once; the backward is not split and GP410 says why."""
    counts = [0]

    def step(model, x):
        handle = model.trunk.register_full_backward_hook(lambda m, gi, go: counts.__setitem__(0, counts[0] + 1))
        h = model.trunk(x)
        (F.mse_loss(model.a(h), torch.zeros(4, 3)) + F.l1_loss(model.b(h), torch.ones(4, 2))).backward()
        handle.remove()

    t = _same(step, reset=lambda: counts.__setitem__(0, 0))
    assert counts[0] == 1
    (finding,) = _skipped(t)
    assert "module backward hook" in finding.message


def test_hooks_are_restored_after_the_passes():
    """The emptied hook dicts are refilled: the same handles still remove their hooks."""
    model = _Net()
    x = torch.randn(4, 6)
    calls = []
    with gradprobe.trace(model, decompose=True, on_finding="record"):
        handle = model.a.weight.register_hook(lambda g: calls.append(1))
        h = model.trunk(x)
        (F.mse_loss(model.a(h), torch.zeros(4, 3)) + F.l1_loss(model.b(h), torch.ones(4, 2))).backward()
        assert calls == [1]
        handle.remove()
        assert not model.a.weight._backward_hooks or all(
            "gradprobe" in getattr(f, "__module__", "") for f in model.a.weight._backward_hooks.values()
        )


def test_compiled_region_is_split_and_grad_unchanged():
    """torch.compile's AOTAutograd Function is safe to run again: the backward is split, .grad bitwise untraced."""

    def step(model, x):
        compiled = torch.compile(model.trunk, backend="aot_eager")
        h = compiled(x)
        (F.mse_loss(model.a(h), torch.zeros(4, 3)) + F.l1_loss(model.b(h), torch.ones(4, 2))).backward()

    t = _same(step)
    assert not _skipped(t)
    (split,) = [s for s in t.splits() if s.kind == "decomposed"]
    assert split.check is True and split.leaf("trunk.weight").reached == (True, True)
