"""AMP: GradScaler-scaled backward calls are detected and reported unscaled; clip-before-unscale_ is a finding."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from torch import nn

import gradprobe


def _setup() -> tuple[nn.Module, torch.amp.GradScaler, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.amp.GradScaler("cpu"), torch.optim.SGD(model.parameters(), lr=0.1)


def _step(model: nn.Module, scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer, clip_first: bool, dtype: torch.dtype) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    loss = out.float().pow(2).mean()
    scaler.scale(loss).backward()
    if clip_first:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.unscale_(opt)
    else:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_scaled_backward_is_reported_unscaled(dtype: torch.dtype) -> None:
    """The scale is detected; part / scale equals the gradient after scaler.unscale_ (the oracle)."""
    model, scaler, opt = _setup()
    plain, plain_scaler, plain_opt = _setup()
    try:
        _step(plain, plain_scaler, plain_opt, clip_first=False, dtype=dtype)
    except RuntimeError as exc:  # pragma: no cover - older torch without CPU autocast for this dtype
        pytest.skip(f"CPU autocast with {dtype} unsupported here: {exc}")
    with gradprobe.trace(model, on_finding="record") as t:
        _step(model, scaler, opt, clip_first=False, dtype=dtype)
    assert not t.findings
    amp = t._plugins.get_plugin("amp")
    assert list(amp.scales) == [0] and float(amp.scales[0]) == scaler.get_scale()
    m2, s2, o2 = _setup()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=dtype):
        out = m2(x)
    s2.scale(out.float().pow(2).mean()).backward()
    s2.unscale_(o2)
    before_clip = {f"model.{n}": p.grad.norm().item() for n, p in m2.named_parameters()}
    for row in t.breakdown():
        assert row.part(0).norm / float(amp.scales[0]) == pytest.approx(before_clip[row.leaf.name], rel=1e-6)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)
    console = Console(file=io.StringIO(), width=120)
    t.report(console)
    text = console.file.getvalue()
    assert "AMP · GradScaler-scaled backward calls" in text and "scale 6.55e+04" in text


def test_clip_before_unscale_is_a_finding() -> None:
    """clip_grad_norm_ on still-scaled gradients: GP712 at the clip line, naming the parameters."""
    model, scaler, opt = _setup()
    with gradprobe.trace(model, on_finding="record") as t:
        _step(model, scaler, opt, clip_first=True, dtype=torch.bfloat16)
    assert [f.code for f in t.findings] == ["GP712"]
    finding = t.findings[0]
    assert "clip_grad_norm_" in finding.site.source and finding.site.filename == __file__
    assert finding.data["leaves"] == ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]


def test_clip_before_unscale_warns_by_default() -> None:
    """With the default policy the finding is a GradProbeWarning pointing at the user's line."""
    model, scaler, opt = _setup()
    with pytest.warns(gradprobe.GradProbeWarning, match="GP712"):
        with gradprobe.trace(model):
            _step(model, scaler, opt, clip_first=True, dtype=torch.bfloat16)


def test_no_scaler_no_section() -> None:
    """A plain backward: no scale recorded, no AMP section, no finding."""
    model, _, _ = _setup()
    with gradprobe.trace(model, on_finding="record") as t:
        model(torch.randn(3, 4)).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert not t._plugins.get_plugin("amp").scales and not t.findings
    console = Console(file=io.StringIO(), width=120)
    t.report(console)
    assert "AMP" not in console.file.getvalue()


def test_disabled_scaler_is_not_scaling() -> None:
    """GradScaler(enabled=False).scale(loss) is the loss itself: nothing to report."""
    model, _, opt = _setup()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with gradprobe.trace(model, on_finding="record") as t:
        scaler.scale(model(torch.randn(3, 4)).pow(2).mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert not t._plugins.get_plugin("amp").scales and not t.findings
