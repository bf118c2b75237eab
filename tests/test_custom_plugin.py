"""The example third-party plugin (examples/custom_plugin/) installs with pip and joins every trace."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import gradprobe
from gradprobe.capture import plugin_catalog as _catalog

PACKAGE = Path(__file__).parent.parent / "examples" / "custom_plugin"


@pytest.fixture(scope="module")
def installed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example package into a fresh folder (offline; the source is copied so no build files land in examples/)."""
    source = tmp_path_factory.mktemp("src") / "custom_plugin"
    shutil.copytree(PACKAGE, source)
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--target", str(target), str(source)],
        check=True,
    )
    return target


@pytest.fixture
def installed(installed_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Put the install on sys.path for one test, and forget its entry point afterwards."""
    monkeypatch.syspath_prepend(str(installed_dir))
    monkeypatch.setenv("GRADPROBE_NORM_BUDGET", "2.0")
    yield
    monkeypatch.undo()
    sys.modules.pop("gradprobe_normbudget", None)
    gradprobe.refresh_plugins()


def run_two_heads(**options: object) -> gradprobe.Trace:
    torch.manual_seed(0)
    backbone, head = nn.Linear(16, 32), nn.Linear(32, 4)
    x = torch.randn(64, 16)
    with gradprobe.trace(backbone, head, on_finding="record", **options) as t:
        (25.0 * head(torch.relu(backbone(x))).pow(2).mean()).backward()
    return t


def test_installed_plugin_shows_its_finding_and_report_section(installed: None) -> None:
    """After install + refresh_plugins(), the plugin runs in a trace nobody configured for it."""
    assert "normbudget" in gradprobe.refresh_plugins()
    t = run_two_heads()
    assert "normbudget" in t.plugin_names
    budget = [f for f in t.findings if f.code == "NB001"]
    assert budget and budget[0].plugin == "normbudget" and "over its budget of 2" in budget[0].message
    out = io.StringIO()
    t.report(Console(file=out, width=120))
    assert "Gradient-norm budget" in out.getvalue() and "NB001" in out.getvalue()


def test_installed_plugin_can_be_disabled(installed: None) -> None:
    """disable=["normbudget"] leaves the installed plugin out of one trace."""
    gradprobe.refresh_plugins()
    t = run_two_heads(disable=["normbudget"])
    assert "normbudget" not in t.plugin_names and not [f for f in t.findings if f.code == "NB001"]


def test_not_installed_plugin_is_not_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the install the entry point is absent (the test above is not vacuous)."""
    monkeypatch.setattr(_catalog, "_entry_point_cache", None)
    assert "normbudget" not in gradprobe.refresh_plugins()
    assert "normbudget" not in run_two_heads().plugin_names
