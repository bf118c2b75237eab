"""What gradprobe turns off under ``torch.func`` transforms, and the one notice that says so.

# NOTE [torch.func]
# `torch.func.grad` / `vjp` / `jacrev` / `vmap` call `torch.autograd.grad` on functorch-wrapped
# tensors while a transform is active (`torch._C._are_functorch_transforms_active()`), usually on
# parameters swapped in by `functional_call`, so the traced leaves' hooks never fire and a record
# would claim a backward that added nothing to any `.grad`. Those calls are passed straight through,
# unrecorded, and the trace says so once (an info finding at the first such call). Everything
# outside the transforms is recorded as usual.

# NOTE [torch.compile]
# Leaf tensor hooks and post-accumulate hooks fire under torch.compile, so the per-backward parts
# are exact there too. What cannot work inside a compiled region is anything the interceptor does
# per op with the user's source line (in-place write and `.grad` read detectors): Dynamo would
# break the graph at each frame walk. While Dynamo traces, the interceptor passes every op straight
# on, and the trace says so once, at the first backward through a compiled graph (the graph holds a
# `CompiledFunctionBackward` node). `Recorder.run_backward` itself runs outside Dynamo
# (`torch.compiler.disable`), so a backward inside a compiled function costs one graph break,
# the one PyTorch makes anyway.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from gradprobe.capture.graph import iter_nodes
from gradprobe.findings import Finding

if TYPE_CHECKING:
    from gradprobe.capture.sites import Site

__all__ = ["COMPILED_CODE", "FUNCTORCH_CODE", "compiled_notice", "functorch_active", "functorch_notice", "has_compiled_node"]

FUNCTORCH_CODE = "GP701"
COMPILED_CODE = "GP702"


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running on this thread."""
    return bool(torch._C._are_functorch_transforms_active())


def functorch_notice(site: Site | None) -> Finding:
    """The notice for the first gradient computed inside a torch.func transform."""
    return Finding(
        code=FUNCTORCH_CODE,
        kind="functorch_transform",
        severity="info",
        message=(
            "gradients computed inside torch.func transforms (grad, vmap, jacrev, vjp with "
            "functional_call) are not recorded: functional_call swaps the parameters, so their hooks "
            "never fire and the gradients never reach .grad; gradprobe passes these calls through untouched"
        ),
        site=site,
        fix=(
            "to see per-loss parts, compute the loss with the module itself and call loss.backward() "
            "(or torch.autograd.grad) outside the transform"
        ),
        plugin="trace",
    )


def has_compiled_node(roots: tuple[torch.Tensor, ...]) -> bool:
    """Whether the graph of ``roots`` runs through a torch.compile'd (AOTAutograd) region."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled: skip a walk of the whole graph
        return False
    nodes = iter_nodes(r.grad_fn for r in roots if r.grad_fn is not None)
    return any(type(node).__name__ == "CompiledFunctionBackward" for node in nodes)


def compiled_notice(site: Site | None) -> Finding:
    """The notice for the first backward through a torch.compile'd region."""
    return Finding(
        code=COMPILED_CODE,
        kind="compiled_region",
        severity="info",
        message=(
            "this backward runs through a torch.compile'd region: gradients and per-loss parts are "
            "recorded exactly, but in-place writes and .grad reads inside compiled code are not watched"
        ),
        site=site,
        fix="to check those too, run one step eagerly (without torch.compile) under gradprobe",
        plugin="trace",
    )
