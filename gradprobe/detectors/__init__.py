"""Built-in mistake detectors, one per module, each registered as a gradprobe plugin.

Each detector is a plugin class named in ``gradprobe.capture.plugin_catalog.BUILTIN_PLUGINS`` under its finding
kind, so ``trace(disable=["nonfinite"])`` leaves it out. ``trace(detect=...)`` picks which run:
``"default"`` (the cheap ones, ``default = True`` on the class), ``"all"``, or a list of names.

Finding codes (stable) are listed in :data:`CODES`, one line each; the README's "Finding codes"
section is generated from it (``python -m gradprobe codes --write README.md``; a test compares the
two). The table as text follows.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["CODES", "Code", "codes_markdown", "codes_table"]


class Code(NamedTuple):
    """One finding code: who emits it, how bad it is, whether it runs by default, what it means."""

    code: str
    kind: str  # the plugin (what ``disable=`` / ``detect=`` take), or "(trace core)" / "(plugin host)"
    severity: str
    default: bool
    meaning: str  # one line, Markdown


CODES: tuple[Code, ...] = (
    Code("GP000", "(plugin host)", "warning", True,
         "an installed or given plugin raised: it is switched off for the rest of the trace"),
    Code("GP001", "(plugin host)", "warning", True,
         "internal error in one of gradprobe's own detectors: switched off, please report it (the others keep running)"),
    Code("GP101", "freed_graph", "error", True,
         "this backward will raise \"backward through the graph a second time\": names the backward that freed the "
         "graph, the line that created the shared tensor, the fix for the case, and draws the shared subgraph"),
    Code("GP102", "freed_graph", "warning", True,
         "this backward frees saved tensors another live, not yet backwarded loss still needs (info \"predicted, did "
         "not happen\" when that backward never ran); draws the shared subgraph"),
    Code("GP103", "freed_graph", "info", True,
         "this backward goes through an in-place write to a view (`CopySlices`) an earlier backward ran: what it "
         "saved is hidden, PyTorch may raise here"),
    Code("GP111", "kept_graph", "warning", True,
         "a tensor with a grad_fn carried across optimizer steps keeps every step's graph alive (`total_loss += loss`, "
         "`losses.append(loss)`): the line, nodes and bytes held, growth per step, `.item()` / `.detach()`"),
    Code("GP112", "retained_graph", "warning", True,
         "`retain_graph=True` kept saved tensors (bytes, nodes) alive for no later backward: drop it (info when "
         "only the end of the trace came first)"),
    Code("GP201", "nonleaf_grad", "warning", True,
         "`.grad` read on a non-leaf that does not retain grad (it is None): which op made it, where, the fix"),
    Code("GP202", "nonleaf_grad", "warning", True,
         "the same, ahead of time: at the backward, code after it reads such a `.grad`"),
    Code("GP203", "nonleaf_grad", "warning", True,
         "`.grad` is None although the tensor retains grad: `retain_grad()` came after the backward"),
    Code("GP302", "inplace_saved", "error", True,
         "this backward will raise \"modified by an inplace operation\": names the line that wrote in place "
         "(`opt.step()`, `x += 1`, `relu_`), before the engine starts"),
    Code("GP400", "conflict (decompose)", "warning", True,
         "two losses pull a module's gradient against each other (cosine <= -0.5, both parts non-negligible)"),
    Code("GP401", "stale_grad", "warning", True,
         "a backward adds to `.grad` left from before an optimizer step (`zero_grad()` missing)"),
    Code("GP402", "stale_grad", "warning", True, "`.grad` was already non-zero when the trace started"),
    Code("GP410", "decompose_skipped (decompose)", "info", True,
         "this backward was not split into per-loss parts: its graph holds a custom autograd.Function not "
         "declared pure or a module backward hook, which gradprobe's extra passes would run a second time"),
    Code("GP501", "unreached", "error", True,
         "the loss does not require grad, and which op cut it (`.item()`, `.detach()`, `.data`, `no_grad`, NumPy): "
         "PyTorch will raise \"element 0 of tensors does not require grad\""),
    Code("GP502", "unreached", "warning", True,
         "the loss is a leaf (`loss.requires_grad = True` on a cut loss): its backward reaches no parameter"),
    Code("GP503", "unreached", "warning", True, "traced parameters no backward reached"),
    Code("GP504", "unreached", "info", True, "a loss reaches none of some parameters other losses reach"),
    Code("GP505", "unreached", "error", True,
         "the loss's graph starts at a leaf cut from the model (`pred = model(x).detach(); pred.requires_grad = True`): "
         "its backward reaches no parameter; names the line that cut it"),
    Code("GP601", "nonfinite", "error", True, "the first backward that produced a NaN/Inf gradient, and where"),
    Code("GP602", "nonfinite_modules", "error", False,
         "the module whose backward first turned a finite gradient into NaN/Inf"),
    Code("GP701", "(trace core)", "info", True, "gradients taken inside torch.func transforms are not recorded"),
    Code("GP702", "(trace core)", "info", True,
         "in-place writes and `.grad` reads inside compiled code are not watched"),
    Code("GP712", "amp", "warning", True,
         "gradients clipped while still scaled by a GradScaler (clip after `scaler.unscale_(optimizer)`)"),
    Code("GP713", "amp", "warning", True,
         "`.grad` read (a norm, a log) while still scaled by a GradScaler, with the scale factor"),
    Code("GP721", "ddp", "error", True,
         "DDP parameters no loss reached in a synchronising backward, by name, before DDP's own error"),
    Code("GP722", "ddp", "error", True, "ranks hold different all-reduced `.grad` (from `t.gather()`)"),
    Code("GP801", "optimizer", "error", True,
         "`optimizer.step()` updates none of the parameters that got gradients (built on another copy of the model, "
         "or on parameters replaced since): the step line and the line that built it"),
    Code("GP802", "optimizer", "warning", True,
         "traced parameters got gradients before an optimizer step that no optimizer holds"),
    Code("GP803", "frozen_update", "warning", False,
         "a frozen parameter (`requires_grad=False`) that an optimizer step still changed (its `.grad` still set)"),
)


def codes_table() -> str:
    """:data:`CODES` as a fixed-width text table (for the docstring and the terminal)."""
    lines = [f"{'code':6} {'kind (plugin)':22} {'severity':8} {'default':7} meaning"]
    for c in CODES:
        lines.append(f"{c.code:6} {c.kind:22} {c.severity:8} {'yes' if c.default else 'no':7} {c.meaning}")
    return "\n".join(lines)


def codes_markdown() -> str:
    """:data:`CODES` as the README's Markdown table (one line per code)."""
    lines = ["| code | kind (detector) | severity | default | what it catches |", "|---|---|---|---|---|"]
    for c in CODES:
        kind = c.kind if c.kind.startswith("(") else f"`{c.kind.split(' ')[0]}`" + (
            " " + c.kind.split(" ", 1)[1] if " " in c.kind else ""
        )
        lines.append(f"| {c.code} | {kind} | {c.severity} | {'yes' if c.default else 'no'} | {c.meaning} |")
    return "\n".join(lines) + "\n"


__doc__ = (__doc__ or "") + "\n" + codes_table() + "\n"
