"""A backward call made inside a training library: the user's line, said to be "(inside accelerate)".

NOTE [library call sites] in capture/sites.py: the site moves to the first frame outside the library
(the script line that called it), and ``Site.library`` keeps where the call really was.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fake_library import load_fake_library  # tests/ is on sys.path (conftest.py)

import gradprobe
from gradprobe import Site

ACCELERATE = """
class Accelerator:
    def backward(self, loss, **kwargs):
        loss.backward(**kwargs)
"""


def _line() -> int:
    return sys._getframe(1).f_lineno


def _render(t: gradprobe.Trace, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    t.report(console)
    return console.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize("package", ["accelerate", "lightning"])
def test_a_backward_inside_a_library_is_sited_at_the_user_line_with_a_label(tmp_path: Path, package: str) -> None:
    """The record's site is the user's line, `.library` names the library, str() says "(inside …)"."""
    lib = load_fake_library(tmp_path, package, ACCELERATE)
    accelerator = lib.Accelerator()
    w = torch.ones(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        line = _line() + 1
        accelerator.backward((w * 2).sum())
    (record,) = t.records
    assert (record.site.filename, record.site.lineno) == (__file__, line)
    assert record.site.library == package
    assert str(record.site) == f"test_library_sites.py:{line} (inside {package})"
    assert record.site.source == "accelerator.backward((w * 2).sum())"
    assert record.name == "loss"  # named on the library's line


def test_the_report_says_inside_accelerate_at_every_width(tmp_path: Path) -> None:
    """The calls table shows the user's line with "(inside accelerate)", also at 80 columns."""
    lib = load_fake_library(tmp_path, "accelerate", ACCELERATE)
    accelerator = lib.Accelerator()
    w = torch.ones(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        line = _line() + 1
        accelerator.backward((w * 2).sum())
    for width in (80, 100, 160):
        text = _render(t, width)
        row = next(r for r in text.splitlines() if r.lstrip().startswith("0 "))
        assert f"test_library_sites.py:{line} (inside accelerate)" in " ".join(text.split()), (width, text)
        assert "core.py" not in row, row


def test_findings_at_a_moved_site_carry_the_label(tmp_path: Path) -> None:
    """A finding about the library's backward (GP101, a freed graph) points at the user's line, labelled."""
    lib = load_fake_library(tmp_path, "accelerate", ACCELERATE)
    accelerator = lib.Accelerator()
    w = torch.ones(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        loss = (w.exp() * 2).sum()
        accelerator.backward(loss)
        line = _line() + 2
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            accelerator.backward(loss)
    (finding,) = [f for f in t.findings if f.code == "GP101"]
    assert finding.site == Site(__file__, line) and finding.site.library == "accelerate"
    assert finding.format().startswith(f"test_library_sites.py:{line} (inside accelerate): GP101")
    data = finding.to_dict()
    assert data["site"] == [__file__, line] and data["site_library"] == "accelerate"


def test_to_dict_keeps_the_site_a_pair_and_adds_the_library(tmp_path: Path) -> None:
    """to_dict(): `site` stays `[file, line]`; `site_library` is new (None outside a library)."""
    lib = load_fake_library(tmp_path, "accelerate", ACCELERATE)
    accelerator = lib.Accelerator()
    w = torch.ones(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        (w * 3).sum().backward()
        accelerator.backward((w * 2).sum())
    records = json.loads(json.dumps(t.to_dict()))["records"]
    assert [len(r["site"]) for r in records] == [2, 2]
    assert [r["site_library"] for r in records] == [None, "accelerate"]


def test_the_label_is_no_part_of_the_place() -> None:
    """Sites compare, hash and sort by (filename, lineno): a labelled site equals the plain one."""
    plain, labelled = Site("/x/train.py", 3), Site("/x/train.py", 3, "accelerate")
    assert plain == labelled and not plain != labelled and hash(plain) == hash(labelled)
    assert labelled in {plain} and plain == ("/x/train.py", 3) and labelled != Site("/x/train.py", 4)
    assert sorted([labelled, Site("/a.py", 9), plain])[0] == Site("/a.py", 9)  # no None < str comparison
    assert str(plain) == "train.py:3" and str(labelled) == "train.py:3 (inside accelerate)"
    filename, lineno = plain[:2]
    assert (filename, lineno) == ("/x/train.py", 3)
