"""trace(..., decompose=...): per-loss parts of one backward of a combined loss."""

from __future__ import annotations

import gc
import inspect
import io
import weakref

import pytest
import torch
import torch.nn.functional as F
from models import MLP, MultiTask, TinyFPNDetector, TinyLSTM, TinyTransformer
from rich.console import Console

import gradprobe
from gradprobe.analysis.decompose_plugin import parse_decompose
from gradprobe.analysis.losses import LOSS_FUNCTIONS



@pytest.fixture(autouse=True)
def _fresh_graph_cache():
    """Each test starts as a fresh process would: no graph of it decomposed (and checked) before."""
    from gradprobe.analysis import strategy

    strategy._GRAPHS.clear()
    yield
    strategy._GRAPHS.clear()

def _render(t: gradprobe.Trace) -> str:
    buf = io.StringIO()
    t.report(Console(file=buf, width=160))
    return buf.getvalue()


def _oracle(model: torch.nn.Module, losses: dict[str, torch.Tensor], weights: dict[str, float]) -> dict:
    """Per-loss weighted gradients from plain autograd, per leaf name (the tests' variable is `model`)."""
    names = [f"model.{n}" for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    out = {}
    for key, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[key] = {n: (None if g is None else weights[key] * g) for n, g in zip(names, grads)}
    return out


def _fpn_step(model, x, t=None):
    losses = model.losses(x)
    if t is not None:
        t.losses(losses)
    return losses


@pytest.mark.parametrize("value,every", [(True, 1), (False, 0), (None, 0), ("every:3", 3)])
def test_parse_decompose(value, every):
    """decompose= takes True, False or 'every:N'."""
    assert parse_decompose(value) == every


@pytest.mark.parametrize("bad", ["every:0", "every:x", "always", 2])
def test_parse_decompose_rejects(bad):
    """Bad decompose= values raise a ValueError that shows the accepted forms."""
    with pytest.raises(ValueError, match="every:N"):
        gradprobe.trace(decompose=bad)


def test_fpn_parts_match_autograd_and_sum_to_backward(device):
    """On the FPN detector, each part equals w_i * g_i from plain autograd and the parts sum to .grad."""
    model = TinyFPNDetector().to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    with gradprobe.trace(model, decompose=True, keep="tensors") as t:
        losses = _fpn_step(model, x, t)
        oracle = _oracle(model, losses, {"cls": 1.0, "box": 0.5})
        (losses["cls"] + 0.5 * losses["box"]).backward()
    (split,) = [s for s in t.splits() if s.kind == "decomposed"]
    assert split.losses == ("cls", "box")
    assert split.weights == ("1", "0.5")
    assert split.check is True
    for leaf in split.leaves:
        name = leaf.leaf.name
        for i, key in enumerate(("cls", "box")):
            want = oracle[key][name]
            assert leaf.reached[i] == (want is not None)
            if want is not None:
                torch.testing.assert_close(leaf.parts[i], want, rtol=1e-5, atol=1e-7)
    assert not split.leaf("cls_head.weight").reached[1]  # the box loss never reaches the cls head
    assert "Per-loss split of one backward" in _render(t)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("keep", ["stats", "tensors"])
def test_grad_is_bitwise_untouched(keep):
    """Decomposition leaves .grad bitwise what the untraced backward gives (the backward runs once)."""
    model = TinyFPNDetector()
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    losses = model.losses(x)
    (losses["cls"] + 0.5 * losses["box"]).backward()
    plain = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with gradprobe.trace(model, decompose=True, keep=keep) as t:
        losses = model.losses(x)
        (losses["cls"] + 0.5 * losses["box"]).backward()
    traced = _grads(model)
    assert plain.keys() == traced.keys()
    assert all(torch.equal(plain[n], traced[n]) for n in plain)
    assert len(t.records) == 1  # gradprobe's own autograd calls are not recorded


def test_sum_equals_separate_backwards():
    """(l1 + l2).backward() decomposed shows the same parts as l1.backward(retain_graph); l2.backward()."""
    model = TinyFPNDetector()
    x = torch.randn(2, 3, 16, 16)
    with gradprobe.trace(model, keep="tensors") as sep:
        losses = model.losses(x)
        sep.name(losses["cls"], "cls")
        sep.name(losses["box"], "box")
        losses["cls"].backward(retain_graph=True)
        losses["box"].backward()
    model.zero_grad(set_to_none=True)
    with gradprobe.trace(model, keep="tensors", decompose=True) as summed:
        losses = summed.losses(model.losses(x))
        (losses["cls"] + losses["box"]).backward()
    (per,) = [s for s in sep.splits() if s.kind == "per-backward"]
    (dec,) = [s for s in summed.splits() if s.kind == "decomposed"]
    assert per.losses == dec.losses == ("cls", "box")
    for a, b in zip(per.leaves, dec.leaves):
        assert a.leaf.name == b.leaf.name and a.reached == b.reached
        for pa, pb in zip(a.parts, b.parts):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
        for sa, sb in zip(a.shares, b.shares):
            assert (sa is None) == (sb is None) or a.total_norm < 1e-6
            if sa is not None and sb is not None and a.total_norm > 1e-6:
                assert sa == pytest.approx(sb, rel=1e-3, abs=1e-4)


def _mlp_two(model, x):
    out = model(x)
    return F.mse_loss(out, torch.zeros_like(out)), F.l1_loss(out[:, :2], torch.ones_like(out[:, :2]))


def _lstm_two(model, x):
    y, (h, c) = model(x)
    return F.mse_loss(y, torch.ones_like(y)), F.mse_loss(h, torch.zeros_like(h))


def _transformer_two(model, x):
    lm, cls = model(x)
    return F.cross_entropy(lm.reshape(-1, lm.shape[-1]), x.reshape(-1)), F.cross_entropy(cls, torch.zeros(len(x), dtype=torch.long))


def _dict_two(model, x):
    out = model(x)  # the model returns a dict
    return F.cross_entropy(out["a"], torch.zeros(len(x), dtype=torch.long)), F.mse_loss(out["b"], torch.ones_like(out["b"]))


@pytest.mark.parametrize(
    "make,step,shape",
    [
        (MLP, _mlp_two, (5, 8)),
        (TinyLSTM, _lstm_two, (3, 4, 5)),
        (TinyTransformer, _transformer_two, None),
        (MultiTask, _dict_two, (4, 6)),
    ],
    ids=["mlp", "lstm", "transformer", "dict-loss"],
)
def test_models_auto_discovered(make, step, shape):
    """With no naming at all, F.* losses are found and the parts add up (✓) on every model."""
    model = make()
    x = torch.randint(0, 20, (2, 6)) if shape is None else torch.randn(*shape)
    with gradprobe.trace(model, decompose=True, keep="tensors", on_finding="record") as t:
        l1, l2 = step(model, x)
        oracle = _oracle(model, {"a": l1, "b": l2}, {"a": 2.0, "b": 1.0})
        (2.0 * l1 + l2).backward()
    (split,) = [s for s in t.splits() if s.kind == "decomposed"]
    assert len(split.losses) == 2 and all("@test_decompose.py:" in n for n in split.losses)
    assert split.check is True
    for leaf in split.leaves:
        for i, key in enumerate("ab"):
            want = oracle[key][leaf.leaf.name]
            if want is not None:
                torch.testing.assert_close(leaf.parts[i], want, rtol=1e-4, atol=1e-6)


def test_loss_used_twice_and_scaled_by_tensor():
    """Weights come from the graph: a loss used twice and one scaled by a tensor are weighted right."""
    model = MLP()
    x = torch.randn(5, 8)
    scale = torch.tensor(3.0)
    with gradprobe.trace(model, decompose=True, keep="tensors") as t:
        out = model(x)
        a = t.name(out.pow(2).mean(), "a")
        b = t.name(out.sum(), "b")
        oracle = _oracle(model, {"a": a, "b": b}, {"a": 1.5, "b": 3.0})
        (a + 0.5 * a + scale * b).backward()
    (split,) = t.splits()
    assert split.losses == ("a", "b") and split.weights == ("1.5", "3")
    assert split.check is True
    for leaf in split.leaves:
        torch.testing.assert_close(leaf.parts[0], oracle["a"][leaf.leaf.name], rtol=1e-5, atol=1e-7)


def test_rest_term_is_shown_as_derived():
    """A term outside the named losses (weight decay) becomes a '(rest)' part, derived and said so."""
    model = MLP()
    x = torch.randn(5, 8)
    with gradprobe.trace(model, decompose=True, keep="tensors") as t:
        out = model(x)
        l1 = F.mse_loss(out, torch.zeros_like(out))
        l2 = F.l1_loss(out, torch.ones_like(out))
        (l1 + l2 + 1e-2 * model.fc1.weight.pow(2).sum()).backward()
    (split,) = t.splits()
    assert split.losses[-1] == "(rest)" and split.derived == "(rest)"
    rest = split.leaf("fc1.weight").parts[2]
    torch.testing.assert_close(rest, 2e-2 * model.fc1.weight.detach(), rtol=1e-4, atol=1e-6)
    assert split.leaf("fc2.weight").norms[2] == pytest.approx(0.0, abs=1e-6)
    assert split.leaf("fc1.weight").reached[2] and not split.leaf("fc2.weight").reached[2]
    assert "(rest)" in _render(t)


def test_every_n_and_later_steps_derive_one_part():
    """'every:2' decomposes backwards 1, 3, 5; after the first, one part is derived (k-1 passes)."""
    model = MLP()
    x = torch.randn(5, 8)
    with gradprobe.trace(model, decompose="every:2", keep="tensors") as t:
        for _ in range(5):
            model.zero_grad()
            l1, l2 = _mlp_two(model, x)
            (l1 + l2).backward()
    splits = [s for s in t.splits() if s.kind == "decomposed"]
    assert [s.record for s in splits] == [0, 2, 4]
    assert splits[0].check is True and splits[0].derived is None
    assert splits[1].derived is not None and splits[1].check is None
    for a, b in zip(splits[0].leaves, splits[1].leaves):  # same weights, same inputs: same parts
        for pa, pb in zip(a.parts, b.parts):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_no_decomposition_when_off_or_single_loss():
    """decompose=False watches no loss function; a single-loss backward is not split."""
    model = MLP()
    x = torch.randn(5, 8)
    with gradprobe.trace(model) as t:
        assert not set(LOSS_FUNCTIONS) & set(t._mode.table)
        l1, l2 = _mlp_two(model, x)
        (l1 + l2).backward()
    assert t.splits() == []
    model.zero_grad()
    with gradprobe.trace(model, decompose=True) as t2:
        assert set(LOSS_FUNCTIONS) <= set(t2._mode.table)
        l1, _ = _mlp_two(model, x)
        l1.backward()
    assert t2.splits() == []


def test_conflict_finding_and_clean_twin():
    """Two losses pulling the same weights in opposite directions give a 'conflict' warning; aligned ones don't."""
    model = MLP()
    x = torch.randn(5, 8)
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        out = model(x)
        up = F.mse_loss(out, torch.full_like(out, 3.0))
        down = F.mse_loss(out, torch.full_like(out, -3.0))
        (up + 0.8 * down).backward()
    conflicts = [f for f in t.findings if f.kind == "conflict"]
    assert conflicts and conflicts[0].severity == "warning"
    assert "pull against each other" in conflicts[0].message
    assert conflicts[0].site is not None and conflicts[0].site.filename == __file__
    with gradprobe.trace(model, decompose=True, on_finding="record") as clean:
        out = model(x)
        a = F.mse_loss(out, torch.full_like(out, 3.0))
        b = F.mse_loss(out, torch.full_like(out, 2.0))
        (a + b).backward()
    assert not [f for f in clean.findings if f.kind == "conflict"]
    model.zero_grad()
    with pytest.warns(gradprobe.GradProbeWarning, match="pull against each other"):
        with gradprobe.trace(model, decompose=True):
            out = model(x)
            (F.mse_loss(out, torch.full_like(out, 3.0)) + F.mse_loss(out, torch.full_like(out, -3.0))).backward()


def test_per_backward_split_stats_exact_for_two_parts():
    """keep='stats' gives the exact per-backward cosine for two parts, and says so for three."""
    model = MLP()
    x = torch.randn(5, 8)

    def run(keep, n):
        with gradprobe.trace(model, keep=keep, on_finding="record") as t:
            model.zero_grad(set_to_none=True)
            out = model(x)
            for i in range(n):
                F.mse_loss(out, torch.full_like(out, float(i))).backward(retain_graph=i < n - 1)
        return [s for s in t.splits() if s.kind == "per-backward"][0]

    stats, tensors = run("stats", 2), run("tensors", 2)
    for a, b in zip(stats.leaves, tensors.leaves):
        assert a.cosine(0, 1) == pytest.approx(b.cosine(0, 1), abs=1e-5)
        assert a.shares[0] == pytest.approx(b.shares[0], abs=1e-5)
    three = run("stats", 3)
    assert all(leaf.gram is None for leaf in three.leaves)
    assert any("keep='tensors'" in note for note in three.notes)
    assert run("tensors", 3).leaves[0].gram is not None


def test_stats_mode_keeps_no_part_copies_and_no_graph():
    """keep='stats': only Gram matrices survive the backward; the loss graph is not kept alive."""
    model = MLP()
    x = torch.randn(5, 8)
    with gradprobe.trace(model, decompose=True) as t:
        l1, l2 = _mlp_two(model, x)
        probe = weakref.ref(l1)
        (l1 + l2).backward()
        del l1, l2
    entry = t._decomposer().done[0]
    assert all(r.rows is None and r.parts is None and r.gram is not None for r in entry.entries)
    assert not t._decomposer().book._found and not t._decomposer().pending
    assert all(not p._backward_hooks for p in model.parameters())  # every hook removed at exit
    gc.collect()
    assert probe() is None


def test_vmap_failure_falls_back_to_loop_and_says_so(monkeypatch):
    """When the vectorized call fails, the parts come from one call per loss and the report says so."""
    import gradprobe.analysis.decompose as dec

    def broken(*args, **kwargs):
        raise RuntimeError("Batching rule not implemented for aten::fake_op")

    monkeypatch.setattr(dec, "_batched", broken)
    model = MLP()
    with gradprobe.trace(model, decompose=True, keep="tensors") as t:
        l1, l2 = _mlp_two(model, torch.randn(5, 8))
        (l1 + l2).backward()
    (split,) = t.splits()
    assert split.check is True and split.strategy.startswith("loop")
    assert any("vmap failed" in n for n in split.notes)
    assert "vmap failed" in _render(t)


def test_inputs_restricts_leaves():
    """backward(inputs=[...]) decomposes only the given leaves."""
    model = MLP()
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        l1, l2 = _mlp_two(model, torch.randn(5, 8))
        (l1 + l2).backward(inputs=[model.fc2.weight])
    assert t.findings == []  # inputs= left the other parameters out on purpose: not "unreached"
    (split,) = t.splits()
    assert [leaf.leaf.name for leaf in split.leaves] == ["model.fc2.weight"]
    assert split.check is True


def test_module_summary_for_many_layers():
    """A deep model reads per module: leaves are folded into module rows when there are many."""
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        out = model(torch.randn(3, 4))
        (F.mse_loss(out, torch.zeros_like(out)) + F.l1_loss(out, torch.ones_like(out))).backward()
    (split,) = t.splits()
    assert len(split.modules()) == 20
    text = _render(t)
    assert "40 leaves grouped by module" in text and "  weight" not in text


def test_plot_writes_png(tmp_path):
    """t.plot() draws gradient flow by loss to a PNG."""
    pytest.importorskip("matplotlib")
    model = TinyFPNDetector()
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        losses = t.losses(model.losses(torch.randn(2, 3, 16, 16)))
        (losses["cls"] + losses["box"]).backward()
    path = tmp_path / "grad_flow.png"
    fig = t.plot(str(path))
    assert path.stat().st_size > 1000 and fig is not None


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    """Without matplotlib, t.plot() raises an ImportError naming the 'plot' extra."""
    import sys

    model = MLP()
    with gradprobe.trace(model, decompose=True) as t:
        l1, l2 = _mlp_two(model, torch.randn(5, 8))
        (l1 + l2).backward()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"gradprobe\[plot\]"):
        t.plot()


def test_every_leaf_trace_and_autograd_grad():
    """trace() with no targets decomposes every leaf reached; an autograd.grad call is split too."""
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    with gradprobe.trace(decompose=True, keep="tensors") as t:
        out = x @ w
        a = F.mse_loss(out, torch.zeros_like(out))
        b = F.l1_loss(out, torch.ones_like(out))
        (ga,) = torch.autograd.grad(a, w, retain_graph=True)
        (gb,) = torch.autograd.grad(b, w, retain_graph=True)
        (g,) = torch.autograd.grad(a + 2 * b, w)
    (split,) = [s for s in t.splits() if s.kind == "decomposed"]
    leaf = split.leaves[0]
    assert leaf.leaf.tensor is w and split.check is True
    torch.testing.assert_close(leaf.parts[0], ga)
    torch.testing.assert_close(leaf.parts[1], 2 * gb)


def test_round_off_sized_gradients_raise_no_conflict():
    """A BatchNorm-preceded conv bias (gradient ~1e-9) shows no cosine and triggers no finding."""
    model = TinyFPNDetector()
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        losses = t.losses(model.losses(torch.randn(2, 3, 16, 16)))
        (losses["cls"] + losses["box"]).backward()
    (split,) = t.splits()
    bias = split.leaf("stem.0.bias")
    assert bias.largest < 1e-6
    assert not bias.conflicts(max(leaf.largest for leaf in split.leaves))
    assert "≈0" in _render(t)


def test_check_fails_when_parts_do_not_add_up():
    """A backward seeded with its own gradient (not supported) is shown ✗, never passed off as ✓."""
    model = MLP()
    with gradprobe.trace(model, decompose=True) as t:
        l1, l2 = _mlp_two(model, torch.randn(5, 8))
        (l1 + l2).backward(torch.tensor(2.0))
    (split,) = t.splits()
    assert split.check is False
    assert "✗" in _render(t)


def test_derived_part_gram_matches_computed():
    """keep='stats': the Gram matrix with a derived middle part equals the fully computed one."""
    model = MLP()
    x = torch.randn(5, 8)
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        for _ in range(2):
            out = model(x)
            a = t.name(out.pow(2).mean(), "a")
            b = t.name(out.tanh().exp().sin().pow(2).mean() * 3, "b")  # the largest graph: derived
            c = t.name(out[:, 0].sum(), "c")
            (a + b + c).backward()
    first, second = t.splits()[:2]
    assert first.derived is None and second.derived == "b"
    conflicts = [(f.data["split"], f.data["losses"]) for f in t.findings if f.kind == "conflict"]
    assert conflicts == [("decomposed", ["a", "b"])], t.findings  # one finding for both backwards
    for x1, x2 in zip(first.leaves, second.leaves):
        for r1, r2 in zip(x1.gram, x2.gram):
            assert r1 == pytest.approx(r2, rel=1e-4, abs=1e-9)


def test_loss_functions_reach_the_mode_and_modules_are_named_at_the_call():
    """Regression for a torch fact: F.* losses reach a TorchFunctionMode as themselves, nn.*Loss via F."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    with Spy():
        F.cross_entropy(x, y)
        F.mse_loss(x, torch.zeros(4, 3))
        F.binary_cross_entropy_with_logits(x, torch.ones(4, 3))
        torch.nn.SmoothL1Loss()(x, torch.zeros(4, 3))
    assert {F.cross_entropy, F.mse_loss, F.binary_cross_entropy_with_logits, F.smooth_l1_loss} <= set(seen)
    assert {F.cross_entropy, F.mse_loss, F.binary_cross_entropy_with_logits, F.smooth_l1_loss} <= set(LOSS_FUNCTIONS)

    model = MLP()
    criterion = torch.nn.CrossEntropyLoss()
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        out = model(torch.randn(5, 8))
        ce = criterion(out, torch.zeros(5, dtype=torch.long))
        line = inspect.currentframe().f_lineno - 1
        (ce + F.mse_loss(out, torch.zeros_like(out))).backward()
    (split,) = t.splits()
    assert split.losses[0] == f"cross_entropy@test_decompose.py:{line}"


class _BigAndTiny(torch.nn.Module):
    """A wide layer with large gradients and a 16-weight layer whose gradient is ~2e-5 of the largest part."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.big = torch.nn.Linear(256, 1024)
        self.tiny = torch.nn.Linear(4, 4, bias=False)

    def forward(self, x, z):
        return self.big(x) + F.pad(3e-3 * self.tiny(z), (0, 1020))


def test_small_real_conflict_is_shown_not_called_round_off():
    """A layer far above its round-off but below 1e-4 of the model's largest part: share, cosine, GP400."""
    from gradprobe.analysis.split import NEGLIGIBLE

    model = _BigAndTiny()
    x, z = torch.randn(64, 256), torch.randn(64, 4)
    with gradprobe.trace(model, decompose=True, keep="tensors", on_finding="record") as t:
        out = model(x, z)
        up = t.name(F.mse_loss(out, torch.full_like(out, 2.0)), "up")
        down = t.name(F.mse_loss(out, torch.full_like(out, -2.0)), "down")
        (up + 0.9 * down).backward()
    (split,) = t.splits()
    largest = max(leaf.largest for leaf in split.leaves)
    tiny = split.leaf("tiny.weight")
    assert tiny.largest < NEGLIGIBLE * largest  # the old rule called this round-off
    assert tiny.largest > 100 * max(tiny.roundoff)  # it is not: far above its round-off bound
    assert not tiny.negligible(0) and not tiny.negligible(1)
    assert tiny.cosine(0, 1) < -0.5 and all(s is not None for s in tiny.shares)
    (conflict,) = [f for f in t.findings if f.code == "GP400"]
    assert "model.tiny" in dict(conflict.data["modules"]), conflict.message
    text = _render(t).split("Per-loss split of one backward", 1)[1]
    row = next(line for line in text.splitlines() if line.strip().startswith("model.tiny"))
    assert "%" in row and "-0.8" in row and "≈0" not in row, row


def test_float64_norms_of_a_large_layer():
    """Part norms come from float64 dot products: they match a float64 reference to 1e-9 relative."""
    w = torch.randn(2000, 2000, requires_grad=True)
    x = torch.randn(8, 2000)
    with gradprobe.trace(decompose=True, keep="tensors") as t:
        out = x @ w
        a = t.name((out**2).mean(), "a")
        b = t.name(out.abs().mean(), "b")
        (a + b).backward()
    (split,) = t.splits()
    leaf = split.leaves[0]
    for i in range(2):
        want = leaf.parts[i].double().norm().item()
        assert leaf.norms[i] == pytest.approx(want, rel=1e-9)


def test_derived_steps_show_exact_zeros_round_off_and_say_not_checked():
    """Later (derived) steps: a derived loss that misses a leaf is exactly zero there (and that leaf is
    checked), a round-off-only derived part shows ≈0, and the split says "derived: not checked"."""
    model = TinyFPNDetector()
    x = torch.randn(2, 3, 16, 16)
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        for _ in range(2):
            model.zero_grad()
            losses = t.losses(model.losses(x))
            (losses["cls"] + losses["box"]).backward()
    first, second = t.splits()
    assert first.derived is None and "derived" not in first.check_text
    assert second.derived in ("cls", "box")
    d = second.losses.index(second.derived)
    other_head = "box_head.weight" if second.derived == "cls" else "cls_head.weight"
    head = second.leaf(other_head)
    assert not head.reached[d] and head.gram[d][d] == 0.0 and not head.derived and head.check is True
    trunk = second.leaf("stem.0.weight")
    assert trunk.derived and trunk.check is None
    bias = second.leaf("stem.0.bias")  # a conv before BatchNorm: its true gradient is 0
    assert bias.negligible(d) and bias.negligible(1 - d)
    assert "derived: not checked" in second.check_text and "Σ ✓" in second.check_text
    text = _render(t)
    assert "derived: not checked" in text


def _count_strategies(monkeypatch):
    import gradprobe.analysis.decompose as dec

    calls = {"batched": 0, "loop": 0}
    batched, looped = dec._batched, dec._looped

    def spy_batched(*args):
        calls["batched"] += 1
        return batched(*args)

    def spy_looped(*args):
        calls["loop"] += 1
        return looped(*args)

    monkeypatch.setattr(dec, "_batched", spy_batched)
    monkeypatch.setattr(dec, "_looped", spy_looped)
    return calls


def test_conv_graph_picks_the_loop_from_the_graph_without_timing(monkeypatch):
    """A conv + BatchNorm graph: the loop, chosen from the node names; vmap is never tried on the user's step."""
    calls = _count_strategies(monkeypatch)
    model = TinyFPNDetector()
    with gradprobe.trace(model, decompose="every:1", on_finding="record") as t:
        for _ in range(3):
            losses = t.losses(model.losses(torch.randn(2, 3, 16, 16)))
            (losses["cls"] + losses["box"]).backward()
    assert calls == {"batched": 0, "loop": 3}
    first = t.splits()[0]
    assert first.strategy.startswith("loop") and "chosen from the graph" in first.strategy
    assert "Convolution" in first.strategy


def test_vmap_friendly_graph_tries_batched_then_the_loop_once(monkeypatch):
    """An MLP graph starts batched (from the graph), tries the loop once on a later step, keeps the faster."""
    calls = _count_strategies(monkeypatch)
    model = MLP()
    x = torch.randn(5, 8)
    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        for _ in range(4):
            l1, l2 = _mlp_two(model, x)
            (l1 + l2).backward()
    assert calls["batched"] >= 1 and calls["loop"] >= 1 and sum(calls.values()) == 4
    strategies = [s.strategy for s in t.splits()]
    assert strategies[0].startswith("batched") and strategies[1].startswith("loop")
    assert "faster per loss on this graph" in strategies[3]


def test_new_trace_of_a_known_graph_does_not_probe_or_check_again():
    """Once the process decomposed (and checked) a graph, a new trace derives one part from its first step."""
    model = TinyFPNDetector()
    x = torch.randn(2, 3, 16, 16)
    for round_ in range(2):
        with gradprobe.trace(model, decompose=True, on_finding="record") as t:
            losses = t.losses(model.losses(x))
            (losses["cls"] + losses["box"]).backward()
        (split,) = t.splits()
        if round_ == 0:
            assert split.derived is None and split.check is True
        else:
            assert split.derived is not None and "derived: not checked" in split.check_text
            assert "1 extra pass" in split.strategy


def test_each_loss_pass_asks_only_for_the_leaves_it_reaches():
    """The loop asks autograd.grad of each loss only for the leaves that loss reaches."""
    from gradprobe.analysis.decompose import _looped
    from gradprobe.analysis.losses import LossBook, find_components

    model = TinyFPNDetector()
    cls_out, box_out = model(torch.randn(2, 3, 16, 16))
    book = LossBook()
    a = F.mse_loss(cls_out[0], torch.zeros_like(cls_out[0]))
    b = F.mse_loss(box_out[0], torch.zeros_like(box_out[0]))
    book.add(a, F.mse_loss, None)
    book.add(b, F.l1_loss, None)
    comps, _, _ = find_components(a + b, book.candidates({}))
    leaves = list(model.parameters())
    asked = []
    original = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        asked.append(len(inputs))
        return original(outputs, inputs, *args, **kwargs)

    torch.autograd.grad = spy
    try:
        rows = _looped(comps, [[torch.ones(())] for _ in comps], leaves)
    finally:
        torch.autograd.grad = original
    reach = [sum(1 for p in leaves if id(p) in c.leaves) for c in comps]
    assert asked == reach and all(r < len(leaves) for r in reach)
    head = next(i for i, p in enumerate(leaves) if p is model.cls_head.weight)
    assert rows[head][[c.name for c in comps].index("mse_loss")] is not None


def test_report_names_the_strategy_and_its_cost_in_words():
    """Every split says how it was computed and what it cost next to the user's backward, and on which calls."""
    model = TinyFPNDetector()
    x = torch.randn(2, 3, 16, 16)
    with gradprobe.trace(model, decompose="every:2", on_finding="record") as t:
        for _ in range(4):
            model.zero_grad()
            losses = t.losses(model.losses(x))
            (losses["cls"] + losses["box"]).backward()
    first, second = t.splits()
    assert "split cost" in first.cost and "× your backward" in first.cost and "measured on backward call 1;" in first.cost
    assert "one-time set-up" in first.cost  # the process's first backward of this graph
    assert "measured on backward call 3)" in second.cost
    text = _render(t)
    assert "Over all 2 decomposed backwards: split cost" in text and "backward calls 1, 3" in text
    assert "loop (2 extra passes; chosen from the graph" in text and "loop (1 extra pass;" in text
    assert first.to_dict()["cost"] == first.cost
