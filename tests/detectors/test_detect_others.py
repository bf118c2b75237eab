"""stale_grad, unreached, nonfinite, and the detect= / disable= options."""

from __future__ import annotations

import pytest
import torch
from helpers import codes, problems
from models import MLP
from torch import nn

import gradprobe
from gradprobe.capture.plugin_catalog import BUILTIN_PLUGINS

# -- stale_grad ---------------------------------------------------------------------------------


def train(steps: int, zero: bool, micro: int = 1) -> gradprobe.Trace:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradprobe.trace(model, on_finding="record") as t:
        for _ in range(steps):
            if zero:
                opt.zero_grad()
            for _ in range(micro):
                loss = model(torch.rand(4, 8)).pow(2).mean() / micro
                loss.backward()
            opt.step()
    return t


def test_missing_zero_grad_is_flagged() -> None:
    """A training loop without zero_grad(): the second step's backward adds to stale gradients (GP401)."""
    t = train(steps=3, zero=False)
    assert codes(t) == ["GP401"]
    assert "zero_grad()" in t.findings[0].fix


def test_zero_grad_loop_is_clean() -> None:
    """The same loop with opt.zero_grad() gives no finding."""
    assert codes(train(steps=3, zero=True)) == []


def test_micro_batch_accumulation_is_clean() -> None:
    """Accumulating over micro-batches, then one step, then zero_grad(): not stale."""
    assert codes(train(steps=2, zero=True, micro=3)) == []


def test_grad_already_nonzero_at_trace_start() -> None:
    """.grad left from before the trace and not reset: GP402 at the end."""
    model = MLP()
    model(torch.rand(2, 8)).sum().backward()
    with gradprobe.trace(model, on_finding="record") as t:
        model(torch.rand(2, 8)).sum().backward()
    assert codes(t) == ["GP402"]


# -- unreached ----------------------------------------------------------------------------------


def cut_finding(t: gradprobe.Trace) -> str:
    return next(f for f in t.findings if f.code == "GP501").message


def test_loss_cut_by_item() -> None:
    """A loss rebuilt from `.item()`: GP501 before PyTorch raises, naming `.item()`."""
    model = MLP()
    with gradprobe.trace(model, on_finding="record") as t:
        out = model(torch.rand(2, 8))
        loss = torch.tensor(out.mean().item())
        with pytest.raises(RuntimeError, match="does not require grad"):
            loss.backward()
    assert ".item()" in cut_finding(t)


def test_loss_cut_by_detach() -> None:
    """A loss computed from `.detach()`: GP501 names `.detach()`."""
    model = MLP()
    with gradprobe.trace(model, on_finding="record") as t:
        out = model(torch.rand(2, 8))
        features = out.detach()
        loss = features.mean()
        with pytest.raises(RuntimeError, match="does not require grad"):
            loss.backward()
    assert ".detach()" in cut_finding(t)


def test_loss_cut_by_no_grad() -> None:
    """A loss computed under torch.no_grad(): GP501 names it."""
    model = MLP()
    with gradprobe.trace(model, on_finding="record") as t:
        with torch.no_grad():
            loss = model(torch.rand(2, 8)).mean()
        with pytest.raises(RuntimeError, match="does not require grad"):
            loss.backward()
    assert "no_grad" in cut_finding(t)


def test_loss_cut_by_data() -> None:
    """A loss computed from `.data`: GP501 names `.data`."""
    model = MLP()
    with gradprobe.trace(model, on_finding="record") as t:
        out = model(torch.rand(2, 8))
        loss = out.data.mean()
        with pytest.raises(RuntimeError, match="does not require grad"):
            loss.backward()
    assert ".data" in cut_finding(t)


def test_loss_cut_by_numpy_round_trip() -> None:
    """A loss that went through NumPy: GP501 names the round trip."""
    model = MLP()
    with gradprobe.trace(model, on_finding="record") as t:
        out = model(torch.rand(2, 8))
        loss = torch.tensor(out.detach().numpy().mean())
        with pytest.raises(RuntimeError, match="does not require grad"):
            loss.backward()
    assert "NumPy" in cut_finding(t) or ".detach()" in cut_finding(t)


def test_requires_grad_true_trap() -> None:
    """`loss.requires_grad = True` on a cut loss hides PyTorch's error; gradprobe flags it (GP502)."""
    model = MLP()
    with gradprobe.trace(model, on_finding="record") as t:
        loss = torch.tensor(model(torch.rand(2, 8)).mean().item())
        loss.requires_grad = True
        loss.backward()
    found = [f for f in problems(t) if f.code == "GP502"]
    assert found and ".item()" in found[0].message
    assert "GP503" in codes(t)  # and no parameter got a gradient


def test_unused_parameters_and_per_loss_reach() -> None:
    """A parameter no loss reaches is a warning (GP503); a loss missing what others reach is info (GP504)."""
    model = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1), "unused": nn.Linear(3, 1)})
    with gradprobe.trace(model, on_finding="record") as t:
        x = torch.rand(2, 3)
        model["a"](x).sum().backward()
        model["b"](x).sum().backward()
    assert codes(t) == ["GP503"]
    assert "model.unused.weight" in t.findings[-3].message or any("unused" in f.message for f in t.findings)
    assert sum(f.code == "GP504" for f in t.findings) == 2


def test_all_parameters_reached_is_clean() -> None:
    """One loss reaching every parameter: no finding at all."""
    model = MLP()
    with gradprobe.trace(model, on_finding="record") as t:
        model(torch.rand(2, 8)).sum().backward()
    assert t.findings == []


# -- nonfinite ----------------------------------------------------------------------------------


class Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


def nan_model() -> nn.Sequential:
    m = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 3), Sqrt(), nn.Linear(3, 1))
    with torch.no_grad():
        m[2].weight.zero_()
        m[2].bias.fill_(0.0)
    return m


def test_first_nonfinite_names_loss_and_leaves() -> None:
    """sqrt(0) in the forward: GP601 names the loss and the leaves with NaN/Inf gradients."""
    m = nan_model()
    with gradprobe.trace(m, on_finding="record") as t:
        loss = m(torch.rand(2, 3)).sum()
        loss.backward()
    (finding,) = [f for f in t.findings if f.code == "GP601"]
    assert "`loss`" in finding.message and "2.weight" in finding.message


def test_module_attribution_with_detect_all() -> None:
    """detect="all": GP602 names the module whose backward turned a finite gradient non-finite."""
    m = nan_model()
    with gradprobe.trace(m, on_finding="record", detect="all") as t:
        loss = m(torch.rand(2, 3)).sum()
        loss.backward()
    (finding,) = [f for f in t.findings if f.code == "GP602"]
    assert "`m.3`" in finding.message


def test_finite_gradients_are_clean() -> None:
    """A normal model with every detector on: no finding."""
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 1))
    with gradprobe.trace(m, on_finding="record", detect="all") as t:
        m(torch.rand(2, 3)).sum().backward()
    assert t.findings == []


# -- options ------------------------------------------------------------------------------------


def test_detect_selects_detectors() -> None:
    """detect="default" leaves the costly detectors out (in-place detection is in); "all" and lists choose them."""
    detectors = [n for n, s in BUILTIN_PLUGINS.items() if s.startswith("gradprobe.detectors.")]
    default = gradprobe.trace().plugin_names
    assert "freed_graph" in default and "inplace_saved" in default and "nonfinite_modules" not in default
    assert set(detectors) <= set(gradprobe.trace(detect="all").plugin_names)
    only = gradprobe.trace(detect=["nonleaf_grad"]).plugin_names
    assert [n for n in only if n in detectors] == ["nonleaf_grad"]
    assert "nonfinite" not in gradprobe.trace(disable=["nonfinite"]).plugin_names
    assert "inplace_saved" not in gradprobe.trace(detect="all", disable=["inplace_saved"]).plugin_names
    assert "inplace_saved" not in gradprobe.trace(disable=["inplace_saved"]).plugin_names
    with pytest.raises(ValueError, match="no detector"):
        gradprobe.trace(detect=["nope"])
    with pytest.raises(ValueError):
        gradprobe.trace(detect="some")


def test_codes_are_documented() -> None:
    """Every finding code the detectors can emit is in the code table of gradprobe.detectors."""
    import pathlib
    import re

    import gradprobe.detectors as package

    table = package.__doc__ or ""
    root = pathlib.Path(package.__file__).parent
    emitted = set()
    for path in root.glob("*.py"):
        emitted |= set(re.findall(r'code="(GP\d+)"', path.read_text()))
    # (the table and the README's generated copy of it: tests/detectors/test_codes.py)
    assert emitted and all(code in table for code in emitted)
    readme = (root.parent.parent / "README.md").read_text()
    assert all(code in readme for code in emitted)


def test_no_hooks_left_after_exit() -> None:
    """After the trace exits, no saved-tensor hooks or module hooks remain."""
    m = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 1))
    with gradprobe.trace(m, detect="all", on_finding="record"):
        m(torch.rand(2, 3)).sum().backward()
    y = m(torch.rand(2, 3))
    assert y.grad_fn._raw_saved_mat1.unpack_hook is None  # type: ignore[union-attr]
    assert not torch.nn.modules.module._global_forward_hooks
