"""Every Python code block of the README runs (after a shared prelude that defines the names it uses).

A block that cannot run here is marked by an HTML comment on the line before its fence, which the
rendered README does not show:
  <!-- readme-test: skip: why -->        not run (it needs a GPU, Lightning, several processes ...)
  <!-- readme-test: raises NAME -->      must raise the exception class NAME (from gradprobe or builtins)
  <!-- readme-test: needs MODULE -->     skipped when MODULE cannot be imported
"""

from __future__ import annotations

import builtins
import importlib.util
import re
import textwrap
import warnings
from pathlib import Path

import pytest

import gradprobe

README = Path(__file__).parent.parent / "README.md"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_MARK = re.compile(r"<!-- readme-test: (skip|raises|needs):? *(.*?) *-->\s*$")

PRELUDE = textwrap.dedent(
    """
    import pytest
    import torch
    import torch.nn.functional as F
    from torch import nn

    import gradprobe

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(8, 16)
            self.cls_head = nn.Linear(16, 3)
            self.box_head = nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.trunk(x))
            return self.cls_head(h), self.box_head(h)

    def compute_losses(model, batch):
        x, y, b = batch
        logits, boxes = model(x)
        return F.cross_entropy(logits, y), F.smooth_l1_loss(boxes, b)

    torch.manual_seed(0)
    model = Model()
    x, y, b = torch.randn(6, 8), torch.randint(0, 3, (6,)), torch.randn(6, 4)
    batch = (x, y, b)
    logits, boxes = model(x)
    ce, smooth_l1 = F.cross_entropy, F.smooth_l1_loss
    loss_cls, loss_box = compute_losses(model, batch)
    a = torch.randn(4, requires_grad=True)
    """
)


def blocks() -> list[tuple[int, str, str, str]]:
    """(line, code, mark, argument) per ```python block of the README."""
    text = README.read_text()
    out = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.search(before)
        out.append((line, match.group(1), mark.group(1) if mark else "", mark.group(2) if mark else ""))
    return out


BLOCKS = blocks()


def test_the_readme_has_python_blocks() -> None:
    """The parser finds the README's blocks (so the parametrized test cannot silently run nothing)."""
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{line}" for line, *_ in BLOCKS])
def test_readme_block_runs(block: tuple[int, str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block runs after the prelude; test functions it defines run too (``gradprobe`` as their fixture)."""
    line, code, mark, argument = block
    if mark == "skip":
        pytest.skip(argument)
    if mark == "needs" and importlib.util.find_spec(argument) is None:
        pytest.skip(f"needs {argument}")
    monkeypatch.chdir(tmp_path)  # blocks may write files (plots, exports)
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(PRELUDE, "<prelude>", "exec"), namespace)
    source = compile("\n" * (line) + code, str(README), "exec")

    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gradprobe.GradProbeWarning)  # examples show warnings in comments
            exec(source, namespace)
            for name, value in list(namespace.items()):
                if name.startswith("test_") and callable(value):
                    params = value.__code__.co_varnames[: value.__code__.co_argcount]
                    value(*[gradprobe if p == "gradprobe" else namespace[p] for p in params])

    if mark == "raises":
        error = getattr(gradprobe, argument, None) or getattr(builtins, argument)
        with pytest.raises(error):
            run()
    else:
        run()
