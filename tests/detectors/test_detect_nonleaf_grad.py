"""nonleaf_grad: `.grad` of a non-leaf tensor that does not retain its gradient."""

from __future__ import annotations

import warnings

import torch
from helpers import codes, problems

import gradprobe


def _read(t: torch.Tensor) -> torch.Tensor | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyTorch's own non-leaf warning
        return t.grad


def test_read_of_nonleaf_grad_is_flagged_with_fix() -> None:
    """`b.grad` on a non-leaf: flagged at the read, naming the op; the leaf's .grad only for a cast or view."""
    a = torch.rand(1, 4, requires_grad=True)
    with gradprobe.trace(a, on_finding="record") as t:
        b = a**2
        b.sum().backward()
        got = _read(b)
    assert got is None
    (finding,) = problems(t)
    assert finding.code == "GP201" and "PowBackward0" in finding.message
    assert ".retain_grad()" in finding.fix and "a.grad" not in finding.fix  # a.grad is 2a times b's gradient
    with gradprobe.trace(a, on_finding="record") as t:
        b = a.double()
        b.sum().backward()
        _read(b)
    (finding,) = [f for f in problems(t) if f.code == "GP201"]
    assert "`a.grad`" in finding.fix, [f.format() for f in problems(t)]  # a cast: the same numbers


def test_read_flagged_at_the_read_line() -> None:
    """A direct `x.grad` read in the traced block is reported ahead of the backward, naming the read line."""
    a = torch.rand(3, requires_grad=True)
    with gradprobe.trace(a, on_finding="record") as t:
        x = a.to(torch.float64)
        x.sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            assert x.grad is None
    (finding,) = problems(t)
    assert finding.code == "GP202"
    assert "ToCopyBackward0" in finding.message and ".to() cast" in finding.message
    assert "`a.grad`" in finding.fix
    assert any("reads `x.grad`" in r.role for r in finding.related)


def test_retain_grad_before_backward_is_clean() -> None:
    """`x.retain_grad()` before the backward: `.grad` is filled and nothing is reported."""
    a = torch.rand(3, requires_grad=True)
    with gradprobe.trace(a, on_finding="record") as t:
        x = a * 3
        x.retain_grad()
        x.sum().backward()
        assert x.grad is not None
    assert codes(t) == []


def test_retain_grad_after_backward_is_the_silent_variant() -> None:
    """`x.retain_grad()` called after the backward: PyTorch says nothing; gradprobe flags the None read."""
    a = torch.rand(3, requires_grad=True)
    with gradprobe.trace(a, on_finding="record") as t:
        x = a * 3
        x.sum().backward()
        x.retain_grad()
        assert x.grad is None
    assert "GP203" in codes(t)


def test_read_in_a_helper_is_flagged_at_the_read() -> None:
    """A read the backward's caller cannot see (inside a helper) is flagged at the read itself (GP201)."""
    a = torch.rand(3, requires_grad=True)

    def grad_of(t: torch.Tensor) -> torch.Tensor | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return t.grad

    with gradprobe.trace(a, on_finding="record") as t:
        y = a.sin()
        y.sum().backward()
        grad_of(y)
    assert codes(t) == ["GP201"]
    assert t.findings[0].site.filename == __file__
