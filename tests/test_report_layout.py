"""Reports at 80/100/160 columns and on big models: one line per row, folding, one table, markers."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import gradprobe
from gradprobe.report.tree import MAX_ROWS, group
from report_rows import WIDTHS, assert_rows_fit, render, table_bodies


def bert_like(layers: int = 12) -> nn.Module:
    """A model with BERT's long parameter names (``encoder.layer.3.attention.self.query.weight``)."""
    root = nn.Module()
    root.embeddings = nn.Module()
    root.embeddings.word_embeddings = nn.Embedding(10, 8)
    root.embeddings.LayerNorm = nn.LayerNorm(8)
    root.encoder = nn.Module()
    root.encoder.layer = nn.ModuleList()
    for _ in range(layers):
        block = nn.Module()
        block.attention = nn.Module()
        attn = nn.Module()
        for name in ("query", "key", "value"):
            attn.add_module(name, nn.Linear(8, 8))
        block.attention.add_module("self", attn)
        block.output = nn.Module()
        block.output.dense = nn.Linear(8, 8)
        block.output.LayerNorm = nn.LayerNorm(8)
        root.encoder.layer.append(block)
    return root


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = model.embeddings.LayerNorm(model.embeddings.word_embeddings(x))
    for block in model.encoder.layer:
        a = block.attention.self
        h = h + torch.tanh(a.query(h) * a.key(h)) * a.value(h)
        h = block.output.LayerNorm(h + block.output.dense(h))
    return h


def two_losses(model: nn.Module, t: gradprobe.Trace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = forward(model, torch.tensor([[1, 2, 3, 4]]))
    return (h**2).mean(), h[..., :4].sum()


def test_checker_catches_wrapped_rows() -> None:
    """The row check fails on what rich does unaided: numbers wrapped onto a second line."""
    table = Table(title="Gradient breakdown")
    table.add_column("leaf", no_wrap=True)
    for i in range(6):
        table.add_column(f"loss {i}")
    table.add_row("encoder.layer.0.attention.self.query.weight", *["0.0408 25% ↺-0.34"] * 6)
    text = render(table, 80)
    with pytest.raises(AssertionError):
        assert_rows_fit(text, 80)


@pytest.mark.parametrize("width", WIDTHS)
def test_big_model_two_backwards_folds_into_a_tree(width: int) -> None:
    """150 tensors, two backward calls: a module tree of at most ~MAX_ROWS rows, every row one line."""
    model = bert_like()
    with gradprobe.trace(model) as t:
        a, b = two_losses(model)
        a.backward(retain_graph=True)
        b.backward()
    text = render(t, width)
    assert_rows_fit(text, width)
    assert all(len(body) <= MAX_ROWS + 2 for body in table_bodies(text))
    assert "#1" in text  # both backward calls shown, the shape column goes first
    flat = " ".join(text.split())  # notes wrap at the console's width
    assert "more" in text and "t.report(depth=None) shows every leaf" in flat
    assert "folded into a module tree" in flat


def test_depth_none_shows_every_leaf_and_depth_one_folds_to_top_modules() -> None:
    """``t.report(depth=None)`` has a row per leaf; ``depth=1`` one row per top-level module."""
    model = bert_like(layers=3)
    with gradprobe.trace(model) as t:
        a, b = two_losses(model)
        a.backward(retain_graph=True)
        b.backward()
    full = render(t, 160, depth=None)
    (body,) = table_bodies(full)[:1]
    assert len(body) == len(t.leaves)
    top = render(t, 160, depth=1)
    body = table_bodies(top)[0]
    assert [line.split()[0] for line in body] == ["model.encoder.layer", "model.embeddings"] or len(body) == 2
    with pytest.raises(ValueError, match="depth"):
        t.report(depth=0)


def test_folded_numbers_are_those_of_the_concatenated_gradient() -> None:
    """A module row's ‖part‖, share and ‖.grad‖ equal those of its parameters as one vector."""
    model = bert_like(layers=2)
    params = list(model.encoder.parameters())
    with gradprobe.trace(model) as t:
        a, b = two_losses(model)
        a.backward(retain_graph=True)
        first = torch.cat([p.grad.flatten() for p in params]).clone()
        b.backward()
    final = torch.cat([p.grad.flatten() for p in params])
    second = final - first
    rows = [r for r in t.breakdown() if r.leaf.name.startswith("model.encoder.")]
    g = group(rows)
    assert g.grad_norm == pytest.approx(final.norm().item(), rel=1e-5)
    assert g.part(0).norm == pytest.approx(first.norm().item(), rel=1e-5)
    assert g.part(1).norm == pytest.approx(second.norm().item(), rel=1e-4)
    share0 = (first @ final / (final @ final)).item()
    assert g.part(0).share == pytest.approx(share0, abs=1e-5)
    assert g.part(0).share + g.part(1).share == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("width", WIDTHS)
def test_single_backward_decomposed_shows_one_table(width: int) -> None:
    """One backward of a combined loss, decomposed: the split table only, the breakdown says so in a line."""
    model = bert_like()
    with gradprobe.trace(model, decompose=True) as t:
        a, b = two_losses(model)
        total = sum(t.losses({"sq": a, "sum": b}).values())
        total.backward()
    text = render(t, width)
    assert f"every .grad ({len(t.leaves)} leaves) is what backward #0 added" in text
    assert len(table_bodies(text)) == 1  # the split, not the breakdown too
    rows = assert_rows_fit(text, width)
    assert rows <= MAX_ROWS + 2
    assert "more modules" in text
    assert "Σ" in text


def test_single_backward_without_decomposition_has_no_100_percent_column() -> None:
    """A single backward's breakdown shows ‖.grad‖ once, not a column of 100% shares beside it."""
    model = bert_like(layers=1)
    with gradprobe.trace(model) as t:
        sum(two_losses(model)).backward()
    text = render(t, 100)
    assert "100%" not in text
    assert "every .grad is exactly what backward #0" in text


def test_raised_backward_is_marked_in_the_calls_table() -> None:
    """A backward call that raised says so in the calls table."""
    w = torch.ones(3, requires_grad=True)
    with gradprobe.trace(w, on_finding="record") as t:
        y = (w * w).sum()
        y.backward()
        with pytest.raises(RuntimeError):
            y.backward()
    text = render(t, 100)
    assert "✗ raised RuntimeError" in text


def test_sections_are_separated_and_struck_parts_have_a_legend() -> None:
    """A blank line between sections; struck-through parts (autograd.grad) explained; "leaves" spelled right."""
    w = torch.ones(3, requires_grad=True)
    with gradprobe.trace(w) as t:
        (g,) = torch.autograd.grad((w * w).sum(), w)
        (w * 3).sum().backward()
    text = render(t, 100)
    assert "struck through: a part no longer in .grad" in text
    assert "leafs" not in text
    lines = text.splitlines()
    for title in ("Gradient breakdown", "No findings."):
        i = next(i for i, line in enumerate(lines) if line.startswith(title))
        assert lines[i - 1].strip() == "", f"no blank line before {title!r}:\n{text}"


def test_captions_use_the_full_width() -> None:
    """Notes under a table wrap at the console's width, not at the (narrower) table's."""
    w = torch.ones(3, requires_grad=True)
    with gradprobe.trace(w) as t:
        (w * w).sum().backward()
        (w * 2).sum().backward()
    console = Console(file=io.StringIO(), width=300, color_system=None)
    t.report(console=console)
    text = console.file.getvalue()
    legend = next(line for line in text.splitlines() if line.startswith("‖part‖ share%"))
    assert "≈0: within the part's round-off bound" in legend  # the whole legend on one 300-column line


@pytest.mark.parametrize("width", WIDTHS)
def test_merged_ddp_report_rows_fit(width: int) -> None:
    """The merged (DDP) report keeps each leaf on one line too."""
    from gradprobe.report.distributed import MergedTrace, summarize

    model = bert_like(layers=2)
    with gradprobe.trace(model) as t:
        a, b = two_losses(model)
        a.backward(retain_graph=True)
        b.backward()
    merged = MergedTrace([summarize(t, 0, 2), summarize(t, 1, 2)])
    text = render(merged, width)
    assert "merged over 2 ranks" in text
    assert assert_rows_fit(text, width) == len(t.leaves)
