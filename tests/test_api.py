"""The public surface: exports, record/finding dataclasses, JSON forms."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gradprobe
from gradprobe import BackwardRecord, Finding, GradProbeError, GradProbeWarning


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted, and lists every public name the package exposes."""
    assert gradprobe.__all__ == sorted(gradprobe.__all__)
    public = {name for name in dir(gradprobe) if not name.startswith("_")} - {"annotations"}  # __future__
    modules = {name for name in public if type(getattr(gradprobe, name)).__name__ == "module"}
    assert set(gradprobe.__all__) - {"__version__"} == public - modules
    for name in gradprobe.__all__:
        assert hasattr(gradprobe, name), name


def test_records_and_findings_are_frozen() -> None:
    """Records and findings cannot be changed after the fact."""
    record = BackwardRecord(index=0, name="loss", site=None, retain_graph=False, kind="backward")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.name = "other"  # type: ignore[misc]
    finding = Finding(code="GP999", kind="test", severity="info", message="m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.message = "x"  # type: ignore[misc]


def test_finding_rejects_an_unknown_severity() -> None:
    with pytest.raises(ValueError, match="severity must be one of"):
        Finding(code="GP999", kind="test", severity="fatal", message="m")  # type: ignore[arg-type]


def test_error_hierarchy() -> None:
    """gradprobe errors are RuntimeErrors; its warnings are UserWarnings."""
    assert issubclass(GradProbeError, RuntimeError)
    assert issubclass(gradprobe.TraceTargetError, TypeError)
    assert issubclass(GradProbeWarning, UserWarning)
    finding = Finding(code="GP999", kind="test", severity="error", message="m")
    assert GradProbeError("x", finding).finding is finding


def test_emit_follows_on_finding() -> None:
    """emit() records, warns at the user's line, or raises GradProbeError for errors."""
    site = gradprobe.Site(__file__, 1)
    error = Finding(code="GP999", kind="test", severity="error", message="boom", site=site, fix="do x")
    with gradprobe.trace(on_finding="record") as t:
        t.emit(error)
    assert t.findings == [error]
    with gradprobe.trace(on_finding="warn") as t:
        with pytest.warns(GradProbeWarning, match="GP999") as caught:
            t.emit(error)
    assert caught[0].filename == __file__ and caught[0].lineno == 1
    with gradprobe.trace(on_finding="raise") as t:
        with pytest.raises(GradProbeError, match="boom.*Fix: do x") as info:
            t.emit(error)
    assert info.value.finding is error


def test_breakdown_row_lookup_and_dicts() -> None:
    """LeafBreakdown.part() finds a record's part; to_dict forms hold plain types."""
    w = torch.randn(2, requires_grad=True)
    with gradprobe.trace(w) as t:
        (w * 2).sum().backward()
    (row,) = t.breakdown()
    assert row.part(0) is row.parts[0] and row.part(5) is None
    assert row.reached
    assert t.leaves[0].to_dict() == {
        "index": 0, "name": "w", "shape": [2], "dtype": "float32", "device": "cpu", "module": None,
    }
