"""GP102 is a prediction: one whose backward never happens ends the trace as "info"."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import codes

import gradprobe


def test_metric_never_backwarded_is_downgraded() -> None:
    """A metric computed with grad shares the freed graph but is never backwarded: GP102 ends as info."""
    w = torch.rand(3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradprobe.GradProbeWarning)
        with gradprobe.trace(w) as t:
            h = w.exp()
            loss = h.sum()
            metric = (h * 2).mean()  # with grad, never backwarded
            loss.backward()
    (finding,) = t.findings
    assert finding.code == "GP102" and finding.severity == "info"
    assert finding.message.startswith("predicted, did not happen") and "`metric`" in finding.message
    assert codes(t) == []
    del metric


def test_prediction_that_comes_true_stays_a_warning() -> None:
    """The predicted backward happens (and fails): GP102 stays a warning, GP101 follows."""
    w = torch.rand(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        h = w.exp()
        a, b = h.sum(), h.mean()
        a.backward()
        with pytest.raises(RuntimeError, match="second time"):
            b.backward()
    assert codes(t) == ["GP102", "GP101"]
    assert t.findings[0].severity == "warning"


def test_prediction_through_another_expression_comes_true() -> None:
    """The freed node is reached by a backward of another expression: the prediction came true."""
    w = torch.rand(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        h = w.exp()
        a, b = h.sum(), h.mean()
        a.backward()
        with pytest.raises(RuntimeError, match="second time"):
            (b * 2).backward()
    assert codes(t) == ["GP102", "GP101"]
