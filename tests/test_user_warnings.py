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


LIBRARY = '''
def backward(loss):
    loss.backward()
'''


def test_backward_called_by_a_training_library_is_sited_at_the_user_line() -> None:
    """A backward run by accelerate/Lightning code: the site is the user's calling line, the name the library's."""
    fake: dict[str, object] = {}
    exec(compile(LIBRARY, "/venv/lib/python3.11/site-packages/accelerate/accelerator.py", "exec"), fake)
    w = torch.ones(2, requires_grad=True)
    with gradprobe.trace(w) as t:
        line = _line() + 1
        fake["backward"]((w * 2).sum())  # type: ignore[operator]
    (record,) = t.records
    assert record.site is not None and (record.site.filename, record.site.lineno) == (__file__, line)
    assert record.name == "loss"


def test_other_site_packages_are_user_code() -> None:
    """A package outside the training libraries (the user's own, installed) keeps its own line."""
    fake: dict[str, object] = {}
    exec(compile(LIBRARY, "/venv/lib/python3.11/site-packages/mytrainer/step.py", "exec"), fake)
    w = torch.ones(2, requires_grad=True)
    with gradprobe.trace(w) as t:
        fake["backward"]((w * 2).sum())  # type: ignore[operator]
    assert t.records[0].site is not None and t.records[0].site.filename.endswith("mytrainer/step.py")


def _line() -> int:
    import sys

    return sys._getframe(1).f_lineno
