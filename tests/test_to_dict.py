"""Trace.to_dict(): schema version, outcome, splits; strict JSON."""

from __future__ import annotations

import json

import pytest
import torch

import gradprobe
from gradprobe.api.views import SCHEMA


def test_to_dict_has_schema_outcome_and_splits() -> None:
    """Two backward calls: the per-backward split is in "splits"; the block did not raise."""
    w = torch.randn(3, requires_grad=True)
    with gradprobe.trace(w) as t:
        (w * w).sum().backward()
        (w * 3).sum().backward()
    data = json.loads(json.dumps(t.to_dict(), allow_nan=False))
    assert data["schema"] == SCHEMA == 1
    assert data["outcome"] == {"state": "done", "raised": False, "exception": None}
    (split,) = data["splits"]
    assert split["kind"] == "per-backward" and len(split["losses"]) == 2
    assert split["leaves"][0]["shares"][0] + split["leaves"][0]["shares"][1] == pytest.approx(1.0)


def test_to_dict_has_decomposed_splits() -> None:
    """A decomposed backward's split, with each named loss, is in "splits"."""
    model = torch.nn.Linear(3, 2)
    with gradprobe.trace(model, decompose=True) as t:
        out = model(torch.randn(4, 3))
        a, b = out[:, 0].pow(2).mean(), out[:, 1].mean()  # named losses are held by weak reference
        total = sum(t.losses({"a": a, "b": b}).values())
        total.backward()
    (split,) = t.to_dict()["splits"]
    assert split["kind"] == "decomposed" and split["losses"] == ["a", "b"]


def test_to_dict_says_the_block_raised() -> None:
    """A block that raised: outcome.raised is true and names the exception; still strict JSON."""
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(KeyError):
        with gradprobe.trace(w) as t:
            (w * float("inf")).sum().backward()
            raise KeyError("boom")
    data = t.to_dict()
    assert data["outcome"] == {"state": "done", "raised": True, "exception": "KeyError"}
    json.dumps(data, allow_nan=False)


def test_to_dict_without_the_decomposer_has_no_splits() -> None:
    """With the decompose plugin disabled, "splits" is an empty list (not missing)."""
    w = torch.randn(3, requires_grad=True)
    with gradprobe.trace(w, disable=["decompose", "report.decomposition"]) as t:
        (w * w).sum().backward()
        (w * 3).sum().backward()
    assert t.to_dict()["splits"] == []
