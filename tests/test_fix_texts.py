"""Every fix text is valid code for the case at hand: applied to its script, the finding goes away."""

from __future__ import annotations

import re
import runpy
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import gradprobe
from gradprobe.exceptions import TraceTargetError


def run(tmp_path: Path, source: str) -> list[gradprobe.Finding]:
    """Run ``source`` as a script (it traces into ``t``); return the findings."""
    path = tmp_path / f"script{len(list(tmp_path.iterdir()))}.py"  # a new name: linecache keeps old sources
    path.write_text(textwrap.dedent(source).lstrip())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyTorch's own non-leaf .grad warning
        namespace = runpy.run_path(str(path), run_name="__main__")
    return namespace["t"].findings


def code_in(fix: str) -> list[str]:
    return re.findall(r"`([^`]+)`", fix)


NONLEAF = """
import torch
import gradprobe

model = torch.nn.Sequential(torch.nn.Linear(3, 2))
with gradprobe.trace(on_finding="record") as t:
    b = model[0].bias.double()
    loss = (b * b).sum()
    loss.backward()
    print(b.grad)
"""


def test_nonleaf_grad_fixes_are_python_and_each_removes_the_finding(tmp_path: Path) -> None:
    """GP202 on a cast of a parameter: `b.retain_grad()` after line 6, or `model[0].bias.grad`; both work."""
    (finding,) = run(tmp_path, NONLEAF)
    assert finding.code == "GP202"
    retain, leaf_grad = code_in(finding.fix)
    assert retain == "b.retain_grad()" and "right after line 6" in finding.fix
    assert leaf_grad == "model[0].bias.grad"  # Python, not the report's `model.0.bias`
    lines = NONLEAF.lstrip().splitlines()
    with_retain = "\n".join(lines[:6] + ["    " + retain] + lines[6:])
    assert run(tmp_path, with_retain) == []
    with_leaf = NONLEAF.replace("print(b.grad)", f"print({leaf_grad})")
    assert run(tmp_path, with_leaf) == []


@pytest.mark.parametrize("traced", ["model", "model[0]", "model.parameters()", ""])
def test_nonleaf_grad_names_the_leaf_the_same_however_it_was_traced(tmp_path: Path, traced: str) -> None:
    """One naming rule (NOTE [leaf names]): `model[0].bias.grad` whether the model, a submodule or nothing was passed."""
    source = NONLEAF.replace("gradprobe.trace(on_finding", f"gradprobe.trace({traced}, on_finding".replace("(, ", "("))
    (finding,) = [f for f in run(tmp_path, source) if f.code == "GP202"]
    assert code_in(finding.fix)[-1] == "model[0].bias.grad"


def test_nonleaf_grad_names_no_leaf_that_no_variable_holds(tmp_path: Path) -> None:
    """A module held by no variable is reported as `Sequential.0.bias`, which is no Python: no `.grad` suggestion."""
    source = NONLEAF.replace("model = torch.nn.Sequential(torch.nn.Linear(3, 2))", "layers = [torch.nn.Sequential(torch.nn.Linear(3, 2))]")
    source = source.replace("gradprobe.trace(on_finding", "gradprobe.trace(layers[0], on_finding").replace("model[0]", "layers[0][0]")
    (finding,) = [f for f in run(tmp_path, source) if f.code == "GP202"]
    assert code_in(finding.fix) == ["b.retain_grad()"], finding.fix


def test_nonleaf_grad_does_not_suggest_a_different_quantity(tmp_path: Path) -> None:
    """After `b = w * 2` the leaf's .grad is not b's gradient: only retain_grad() is suggested."""
    (finding,) = run(tmp_path, NONLEAF.replace("model[0].bias.double()", "model[0].bias * 2"))
    assert code_in(finding.fix) == ["b.retain_grad()"]


SUMMED = """
import torch
import gradprobe

w = torch.ones(3, requires_grad=True)
with gradprobe.trace(w, on_finding="record") as t:
    l1, l2 = (w.exp()).sum(), (w * w).sum()
    (l1 + l2).backward()
    try:
        (l1 + l2).backward()
    except RuntimeError:
        pass
"""


def test_backward_of_an_expression_is_shown_with_parentheses(tmp_path: Path) -> None:
    """`(l1 + l2).backward()` is written so in messages, and the retain_graph fix removes GP101."""
    findings = [f for f in run(tmp_path, SUMMED) if f.code == "GP101"]
    assert findings, "no GP101"
    assert "`(l1 + l2).backward()` will raise" in findings[0].message
    assert "l1 + l2.backward()" not in findings[0].message + (findings[0].fix or "")
    assert "retain_graph=True" in (findings[0].fix or "")
    fixed = SUMMED.replace("    (l1 + l2).backward()\n    try:", "    (l1 + l2).backward(retain_graph=True)\n    try:")
    assert [f for f in run(tmp_path, fixed) if f.code == "GP101"] == []


def test_integer_tensor_target_is_not_told_to_require_grad() -> None:
    """`trace(torch.arange(3))`: integers never have gradients; no `tensor of shape (3,).requires_grad_()`."""
    with pytest.raises(TraceTargetError) as info:
        gradprobe.trace(torch.arange(3))
    message = str(info.value)
    assert "holds integers (torch.int64)" in message
    assert "requires_grad_()" not in message and "\n" not in message


def test_float_tensor_target_fix_is_valid_code() -> None:
    """A named float tensor: `x.requires_grad_()`, which then makes trace(x) work."""
    x = torch.ones(3)
    with pytest.raises(TraceTargetError) as info:
        gradprobe.trace(x)
    (fix,) = [c for c in code_in(str(info.value)) if c.endswith("requires_grad_()")]
    assert fix == "x.requires_grad_()"
    eval(fix)
    with gradprobe.trace(x) as t:
        (x * 2).sum().backward()
    assert len(t.records) == 1
    with pytest.raises(TraceTargetError, match=r"call `\.requires_grad_\(\)` on it where it is made"):
        gradprobe.trace(torch.ones(2))


def test_state_dict_and_parameter_dict_targets_suggest_real_code() -> None:
    """A state_dict: trace the module; a dict of parameters: `.values()`, which then works. One line each."""
    model = torch.nn.Linear(3, 2)
    sd = model.state_dict()
    with pytest.raises(TraceTargetError) as info:
        gradprobe.trace(sd)
    message = str(info.value)
    assert "\n" not in message and "Parameter" not in message
    assert "`gradprobe.trace(model)`" in message
    params = dict(model.named_parameters())
    with pytest.raises(TraceTargetError) as info:
        gradprobe.trace(params)
    (fix,) = [c for c in code_in(str(info.value)) if c.startswith("gradprobe.trace(")]
    assert fix == "gradprobe.trace(params.values())"
    with eval(fix) as t:
        model(torch.randn(4, 3)).sum().backward()
    assert [leaf.name for leaf in t.leaves] == ["params.weight", "params.bias"] or len(t.leaves) == 2
