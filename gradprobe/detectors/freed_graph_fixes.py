"""The fix texts of the ``freed_graph`` detector: what to change, in the user's terms.

Place in the flow: detectors (a helper of :mod:`gradprobe.detectors.freed_graph`). Each case gets its
own fix: a running total that keeps every step's graph (``total += loss``), a hidden state carried
across iterations, a GAN's generator output fed to the discriminator's loss, an optimizer step between
two backward calls, and the plain "retain_graph=True or one backward of the sum".
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from gradprobe.capture.graph import iter_nodes
from gradprobe.detectors._common import assignment_site, is_augmented

if TYPE_CHECKING:
    from types import FrameType

    from gradprobe.api.trace import Trace
    from gradprobe.capture.calls import BackwardCall
    from gradprobe.detectors.freed_graph import _Freed

__all__ = ["fix_for", "running_total"]

_GAN_NAMES = re.compile(r"fake|gen|sample|synth", re.IGNORECASE)


def fix_for(
    trace: Trace,
    call: BackwardCall,
    frame: FrameType | None,
    earlier: _Freed | None,
    top: Any,
    shared_name: str | None,
    locals_: dict[str, torch.Tensor],
) -> str:
    rec = earlier.record if earlier is not None else None
    where = f" at {rec.site}" if rec is not None and rec.site is not None else ""
    if is_augmented(frame, call.name):
        return running_total(call.name, rec.name if rec else "loss")
    stepped = _changed_leaves(trace, earlier)
    step_note = (
        f" An in-place update (optimizer.step()?) changed {', '.join(stepped[:3])} since that backward, so "
        "retain_graph=True alone would only turn this into the in-place error: run the forward again after the step."
        if stepped
        else ""
    )
    if rec is not None and rec.site is not None and rec.site == call.site:
        carried = _carried(frame, top, call, locals_)
        if carried and is_augmented(frame, carried):
            return (
                f"`{carried}` is carried across iterations with its graph: accumulate a number instead, "
                f"`{carried} += loss.item()`, or `.detach()` it." + step_note
            )
        head = "a tensor from an earlier iteration still holds the graph the previous backward freed: "
        if carried is None:
            return head + "detach it (hidden state, cached embedding) where it is carried into the next iteration." + step_note
        line = assignment_site(frame, carried)
        at = f" before line {line.lineno}" if line else " where it is carried into the next iteration"
        return head + f"call `{carried} = {carried}.detach()`{at}." + step_note
    if shared_name and _looks_like_gan(trace, earlier, top, shared_name):
        return (
            f"`{shared_name}` feeds a loss that should not train what produced it: use "
            f"`{shared_name}.detach()` in the earlier step (the one backwarded{where}); if both losses must "
            f"reach it, pass retain_graph=True{where}." + step_note
        )
    return (
        f"pass retain_graph=True to the earlier backward{where}, or add the losses and call backward once "
        f"(e.g. `({rec.name if rec else 'loss_a'} + {call.name}).backward()`)." + step_note
    )


def running_total(total: str, loss: str) -> str:
    return (
        f"`{total}` is a running total that keeps every step's graph alive: accumulate a number, "
        f"`{total} += {loss}.item()` (or `{loss}.detach()`), and backward each loss on its own"
    )


def _changed_leaves(trace: Trace, earlier: _Freed | None) -> list[str]:
    if earlier is None:
        return []
    changed = []
    for ref, version in earlier.leaves.values():
        leaf = ref()
        if leaf is not None and leaf._version != version:
            state = trace._by_id.get(id(leaf))
            changed.append(f"`{state.leaf.name}`" if state is not None else "a parameter")
    return changed


def _carried(frame: FrameType | None, top: Any, call: BackwardCall, locals_: dict[str, torch.Tensor]) -> str | None:
    """The local that carries the freed graph into this iteration (``h`` in ``out, h = rnn(x, h)``)."""
    roots = {id(r) for r in call.roots}
    holders = []
    for name, t in locals_.items():
        if id(t) in roots or t.grad_fn is None:
            continue
        if any(n is top for n in iter_nodes([t.grad_fn])):
            holders.append(name)
    for name in holders:
        if is_augmented(frame, name):
            return name
    for name in holders:
        line = assignment_site(frame, name)
        if line is not None and re.search(rf"=.*\b{re.escape(name)}\b", line.source):
            return name
    return holders[0] if holders else None


def _looks_like_gan(trace: Trace, earlier: _Freed | None, top: Any, shared_name: str) -> bool:
    """The shared tensor is one module's output fed to another module (a generator's sample)."""
    if _GAN_NAMES.search(shared_name):
        return True
    if earlier is None:
        return False
    behind = {id(getattr(n, "variable", None)) for n in iter_nodes([top])}
    mine, others = set(), set()
    for key, (ref, _) in earlier.leaves.items():
        state = trace._by_id.get(key)
        if state is None or state.leaf.module is None:
            continue
        owner = state.leaf.name.split(".", 1)[0]
        (mine if key in behind else others).add(owner)
    return bool(mine) and bool(others) and not (mine & others)
