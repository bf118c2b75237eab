"""The zero-code entry point: ``gradprobe run script.py [args]`` and ``python -m gradprobe``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gradprobe
from gradprobe.integrations.cli import main, run_script

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn

    print("argv:", sys.argv[1:], "name:", __name__)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    out = model(torch.randn(5, 4))
    loss_a = out[:, 0].pow(2).mean()
    loss_b = out[:, 1].abs().mean()
    loss_a.backward(retain_graph=True)
    loss_b.backward()
    if "--save" in sys.argv:
        torch.save(model[0].weight.grad, sys.argv[sys.argv.index("--save") + 1])
    if "--fail" in sys.argv:
        raise ValueError("boom in the script")
    if "--exit" in sys.argv:
        sys.exit(3)
    """
)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


def test_run_prints_report_with_named_losses(script: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The script runs as __main__ with its arguments; the report names its losses and leaves."""
    assert main(["run", str(script), "--lr", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "argv: ['--lr', '0.1'] name: __main__" in out
    assert "gradprobe · 2 backward calls · 4 leaves" in out
    assert "loss_a" in out and "loss_b" in out and "model.0.weight" in out


def test_run_restores_argv_and_path(script: Path) -> None:
    """sys.argv and sys.path[0] are the caller's again after the script ran."""
    argv, path0 = list(sys.argv), sys.path[0]
    main(["run", "--quiet", str(script), "x"])
    assert sys.argv == argv and sys.path[0] == path0


def test_run_writes_json_and_html(script: Path, tmp_path: Path) -> None:
    """--json writes Trace.to_dict(); --html writes the rich report as an HTML page."""
    out_json, out_html = tmp_path / "o.json", tmp_path / "o.html"
    assert main(["run", "--quiet", "--json", str(out_json), "--html", str(out_html), str(script)]) == 0
    data = json.loads(out_json.read_text())
    assert [r["name"] for r in data["records"]] == ["loss_a", "loss_b"]
    assert [row["leaf"] for row in data["breakdown"]][:1] == ["model.0.weight"]
    assert data["breakdown"][0]["grad_norm"] is not None
    html = out_html.read_text()
    assert "<html" in html.lower() and "loss_a" in html and "Gradient breakdown" in html


def test_run_reports_then_fails_when_script_raises(script: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A failing script still gets its report; the CLI prints the script's traceback and exits 1."""
    assert main(["run", str(script), "--fail"]) == 1
    captured = capsys.readouterr()
    assert "gradprobe · 2 backward calls" in captured.out
    assert "ValueError: boom in the script" in captured.err
    assert 'train.py", line' in captured.err and "cli.py" not in captured.err


def test_run_passes_on_script_exit_code(script: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """sys.exit(3) in the script: report printed, exit status 3."""
    assert main(["run", str(script), "--exit"]) == 3
    assert "gradprobe · 2 backward calls" in capsys.readouterr().out


def test_missing_script_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A script that does not exist: exit status 2 and a message naming the path and the usage."""
    assert main(["run", str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err
    assert "no script at" in err and "nope.py" in err and "gradprobe run train.py" in err


def test_gradients_unchanged_by_cli(script: Path) -> None:
    """The script's gradients are bitwise those of a plain run (keep="tensors": parts sum to .grad)."""
    import runpy

    plain_file, traced_file = script.parent / "plain.pt", script.parent / "traced.pt"
    saved = list(sys.argv)
    sys.argv = [str(script), "--save", str(plain_file)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved
    tracer, error = run_script(str(script), ["--save", str(traced_file)], keep="tensors", quiet=True)
    assert error is None and len(tracer.records) == 2
    assert [row.check for row in tracer.breakdown()] == [True] * 4
    assert torch.equal(torch.load(plain_file), torch.load(traced_file))


def test_python_dash_m(script: Path, tmp_path: Path) -> None:
    """`python -m gradprobe run` works as a real process and exits with the script's status."""
    env = dict(os.environ, PYTHONPATH=str(Path(gradprobe.__file__).parent.parent))
    done = subprocess.run(
        [sys.executable, "-m", "gradprobe", "run", str(script), "--fail"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 1
    assert "gradprobe · 2 backward calls" in done.stdout
    assert "ValueError: boom in the script" in done.stderr


def test_trace_displays_in_jupyter() -> None:
    """Trace._repr_mimebundle_ gives the rich report as HTML and text (what Jupyter shows)."""
    w = torch.ones(3, requires_grad=True)
    with gradprobe.trace(w) as t:
        (w * 2).sum().backward()
    bundle = t._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}
    assert "Gradient breakdown" in bundle["text/plain"] and "<pre" in bundle["text/html"]
    assert set(t._repr_mimebundle_(include=["text/html"])) == {"text/html"}


def test_run_options_reach_the_trace(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--detect, --decompose, --on-finding and --keep are the trace's options."""
    import gradprobe.integrations.cli as cli

    seen: dict[str, object] = {}
    original = cli.Trace

    def spy(targets: object, **options: object) -> object:
        seen.update(options)
        return original(targets, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "Trace", spy)
    args = ["run", "--detect", "freed_graph,unreached", "--decompose-every", "2", "--on-finding", "warn"]
    assert main([*args, "--keep", "tensors", "--quiet", str(script)]) == 0
    assert seen == {
        "keep": "tensors",
        "on_finding": "warn",
        "detect": ["freed_graph", "unreached"],
        "decompose": "every:2",
    }


def test_run_decompose_splits_the_backward(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gradprobe run --decompose` prints the per-loss split of a combined backward."""
    path = tmp_path / "combined.py"
    path.write_text(
        "import torch\nimport torch.nn.functional as F\n"
        "model = torch.nn.Linear(4, 2)\nout = model(torch.randn(8, 4))\n"
        "a = F.mse_loss(out[:, 0], torch.zeros(8))\nb = F.l1_loss(out[:, 1], torch.ones(8))\n"
        "(a + b).backward()\n"
    )
    assert main(["run", "--decompose", str(path)]) == 0
    assert "Per-loss split of one backward" in capsys.readouterr().out


def test_bad_detector_name_is_a_usage_error(script: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown --detect name exits 2 with trace()'s message."""
    assert main(["run", "--detect", "nonsense", str(script)]) == 2
    assert "names no detector called ['nonsense']" in capsys.readouterr().err


def test_gradprobe_option_after_the_script_warns(script: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gradprobe run train.py --json out.json` says --json went to the script."""
    assert main(["run", str(script), "--json", "out.json", "--lr=1"]) == 0
    captured = capsys.readouterr()
    assert "argv: ['--json', 'out.json', '--lr=1']" in captured.out
    assert "warning: --json after the script name goes to the script" in captured.err
    assert "--lr" not in captured.err


def test_syntax_error_prints_the_error_and_no_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A script that does not compile: the SyntaxError, exit 1, no empty report first."""
    path = tmp_path / "broken.py"
    path.write_text("import torch\nx = (1,\n")
    assert main(["run", str(path)]) == 1
    captured = capsys.readouterr()
    assert "gradprobe ·" not in captured.out
    assert "SyntaxError" in captured.err and "broken.py" in captured.err


TRAINING_LOOP = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
    head_cls, head_reg = nn.Linear(16, 3), nn.Linear(16, 1)
    opt = torch.optim.SGD([*trunk.parameters(), *head_cls.parameters(), *head_reg.parameters()], lr=0.05)
    for step in range(30):
        x, y, t = torch.randn(8, 6), torch.randint(0, 3, (8,)), torch.randn(8, 1)
        opt.zero_grad()
        features = trunk(x)
        loss_cls = nn.functional.cross_entropy(head_cls(features), y)
        loss_reg = nn.functional.mse_loss(head_reg(features), t)
        loss_cls.backward(retain_graph=True)
        loss_reg.backward()
        opt.step()
    print("trained")
    """
)


@pytest.fixture
def training_loop(tmp_path: Path) -> Path:
    path = tmp_path / "loop.py"
    path.write_text(TRAINING_LOOP)
    return path


def test_a_training_loop_is_one_trace_of_30_steps(training_loop: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """30 steps, two losses, an optimizer: one trace that counts the steps; its records are the latest steps'."""
    tracer, error = run_script(str(training_loop), quiet=True)
    assert error is None and not tracer.active
    assert tracer.current_step == 30
    records = tracer.records
    assert records[-1].step == 29 and [r.step for r in records[-2:]] == [29, 29]  # two losses per step
    assert "trained" in capsys.readouterr().out


def test_a_training_loop_gets_the_run_report(training_loop: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``gradprobe run loop.py``: the breakdown is of step 29, the latest, not step 0; then the run's section."""
    assert main(["run", str(training_loop)]) == 0
    out = capsys.readouterr().out
    assert "30 steps (0–29)" in out
    assert "step 29, the latest" in out and "step 0, the latest" not in out
    breakdown = out[out.index("Gradient breakdown") : out.index("The run ·")]
    assert "#58" in breakdown and "#59" in breakdown and "#0 " not in breakdown  # step 29's two backward calls
    assert "loss_cls" in out and "loss_reg" in out


def test_window_option(training_loop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--window N`` is trace(window=N): at most 2 × N steps kept in full; a bad N is refused before anything runs."""
    tracer, error = run_script(str(training_loop), quiet=True, window=3)
    assert error is None and tracer.window == 3
    steps = {r.step for r in tracer.records}
    assert max(steps) == 29 and 3 <= len(steps) <= 6
    out = tmp_path / "out.json"
    assert main(["run", "--quiet", "--window", "3", "--json", str(out), str(training_loop)]) == 0
    assert max(r["step"] for r in json.loads(out.read_text())["records"]) == 29
    capsys.readouterr()
    for bad in ("0", "-2", "x"):
        with pytest.raises(SystemExit) as exit_:
            main(["run", "--window", bad, str(training_loop)])
        assert exit_.value.code == 2
        assert "--window: must be a whole number of steps, at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("terminal", [True, False])
def test_live_option(training_loop: Path, monkeypatch: pytest.MonkeyPatch, terminal: bool) -> None:
    """``--live``: a status line at step ends on a terminal, taken off before the report; nothing otherwise."""
    import io

    import rich
    from rich.console import Console

    console = Console(file=io.StringIO(), width=120, force_terminal=terminal, color_system=None)
    monkeypatch.setattr(rich, "_console", console)
    assert main(["run", "--live", str(training_loop)]) == 0
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert ("gradprobe · step 0 · no findings" in text) is terminal
    assert "backward calls" in text  # the report
    if terminal:  # the line is gone (cursor moved back over it) before the report starts
        assert text.index("gradprobe · step 0") < text.index("backward calls")
