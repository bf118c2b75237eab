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


def test_assert_share_takes_decomposed_loss_names() -> None:
    """After one backward of a sum, assert_share works on the component names given with t.losses()."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"trunk": torch.nn.Linear(3, 4), "cls": torch.nn.Linear(4, 2), "box": torch.nn.Linear(4, 1)})
    x = torch.randn(8, 3)
    with gradprobe.trace(model, decompose=True) as t:
        h = model["trunk"](x)
        losses = t.losses({"loss_cls": model["cls"](h).pow(2).mean(), "loss_box": model["box"](h).abs().mean()})
        sum(losses.values()).backward()
    t.assert_share(model["cls"], "loss_cls", at_least=0.999)
    t.assert_share("box", "loss_box", at_least=0.999)
    t.assert_share(model["trunk"], "loss_cls", at_least=0.01, at_most=0.99)
    with pytest.raises(AssertionError, match=r"'loss_box' has a share of 0.0% .*\n.*losses of backward #0:\n  loss_cls: 100.0%"):
        t.assert_share(model["cls"], "loss_box", at_least=0.5)
    with pytest.raises(ValueError, match="no backward call is named 'nope'"):
        t.assert_share(model["cls"], "nope", at_least=0.5)
