"""PyTorch's own warnings inside a trace point at the user's line, as they do without gradprobe."""

from __future__ import annotations

import warnings

import pytest
import torch

import gradprobe


def _read_nonleaf_grad(traced: bool, detect: str = "default") -> list[warnings.WarningMessage]:
    a = torch.ones(2, requires_grad=True)
    with gradprobe.trace(a, on_finding="record", detect=detect) if traced else torch.enable_grad():
        b = a * 2
        b.sum().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            b.grad  # noqa: B018 - the read PyTorch warns about
    return [w for w in caught if "is not a leaf Tensor" in str(w.message)]


@pytest.mark.parametrize("detect", ["default", "all"])
def test_nonleaf_grad_warning_points_at_the_user_line(detect: str) -> None:
    """The non-leaf .grad UserWarning has the same file:line traced and untraced (not intercept.py)."""
    (plain,) = _read_nonleaf_grad(traced=False)
    (traced,) = _read_nonleaf_grad(traced=True, detect=detect)
    assert (traced.filename, traced.lineno) == (plain.filename, plain.lineno) == (__file__, plain.lineno)
    assert traced.category is plain.category is UserWarning


def test_warning_filters_still_apply() -> None:
    """A user's "error" filter still turns the warning into an exception inside a trace."""
    a = torch.ones(2, requires_grad=True)
    with gradprobe.trace(a, on_finding="record"):
        b = a * 2
        b.sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            with pytest.raises(UserWarning, match="not a leaf Tensor"):
                b.grad  # noqa: B018
