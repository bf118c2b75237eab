"""Workers for tests/test_ddp.py: 2 gloo ranks on CPU, started with torch.multiprocessing (spawn).

One process group per rank runs every scenario in turn and saves plain results to ``out/rank{r}.pt``;
the tests then assert on them. Each scenario builds its own DistributedDataParallel module.
"""

from __future__ import annotations

import copy
import gc
import os
import re
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradprobe

WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TwoHeads(nn.Module):
    """A trunk feeding two heads; ``forward`` returns both outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.head_a = nn.Linear(8, 2)
        self.head_b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return self.head_a(h), self.head_b(h)


def batch(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(6, 4, generator=g)


def _model() -> TwoHeads:
    torch.manual_seed(0)
    return TwoHeads()


def _rows(t: gradprobe.Trace) -> dict[str, Any]:
    return {
        row.leaf.name: {
            "check": row.check,
            "note": row.note,
            "local_norm": row.local_norm,
            "grad_norm": row.grad_norm,
            "world": row.world,
            "parts": [(p.record, p.norm, p.share) for p in row.parts],
            "carried": None if row.carried_in is None else row.carried_in.reason,
        }
        for row in t.breakdown()
    }


def _local_grads(model: TwoHeads, steps: list[int], rank: int) -> dict[str, torch.Tensor]:
    """Oracle: this rank's gradients by plain autograd on an undistributed copy."""
    twin = copy.deepcopy(model)
    for step in steps:
        a, b = twin(batch(rank, step))
        (a.square().mean() + b.abs().mean()).backward()
    return {f"model.{n}": p.grad.clone() for n, p in twin.named_parameters()}  # leaf names: under `model`


def scenario_plain(rank: int, keep: str, bucket_view: bool) -> dict[str, Any]:
    model = _model()
    oracle = _local_grads(model, [0], rank)
    ddp = DDP(model, gradient_as_bucket_view=bucket_view)
    with gradprobe.trace(ddp, keep=keep, on_finding="record") as t:
        a, b = ddp(batch(rank, 0))
        (a.square().mean() + b.abs().mean()).backward()
    grads = {f"model.{n}": p.grad.clone() for n, p in model.named_parameters()}
    untraced = DDP(_model(), gradient_as_bucket_view=bucket_view)
    a, b = untraced(batch(rank, 0))
    (a.square().mean() + b.abs().mean()).backward()
    bitwise = all(torch.equal(p.grad, grads[f"model.{n}"]) for n, p in untraced.module.named_parameters())
    merged = t.gather(dst=0)
    return {
        "rows": _rows(t),
        "oracle_norms": {k: float(torch.linalg.vector_norm(v)) for k, v in oracle.items()},
        "oracle": oracle,
        "grads": grads,
        "bitwise_with_untraced": bitwise,
        "findings": [f.code for f in t.findings],
        "report": _render(t),
        "merged": None if merged is None else (merged.to_dict(), _render(merged), len(merged.disagreements)),
    }


def scenario_two_steps(rank: int, bucket_view: bool) -> dict[str, Any]:
    """Two synchronised steps without zero_grad: the second carries the first average in."""
    model = _model()
    ddp = DDP(model, gradient_as_bucket_view=bucket_view)
    with gradprobe.trace(ddp, keep="tensors", on_finding="record") as t:
        for step in (0, 1):
            a, b = ddp(batch(rank, step))
            (a.square().mean() + b.abs().mean()).backward()
    return {"rows": _rows(t), "findings": [f.code for f in t.findings]}


def scenario_no_sync(rank: int) -> dict[str, Any]:
    """A no_sync backward accumulates locally; the next one all-reduces both."""
    model = _model()
    oracle = _local_grads(model, [0, 1], rank)
    ddp = DDP(model)
    with gradprobe.trace(ddp, on_finding="record") as t:
        with ddp.no_sync():
            a, b = ddp(batch(rank, 0))
            (a.square().mean() + b.abs().mean()).backward()
        mid = _rows(t)
        a, b = ddp(batch(rank, 1))
        (a.square().mean() + b.abs().mean()).backward()
    return {
        "mid": mid,
        "rows": _rows(t),
        "oracle_norms": {k: float(torch.linalg.vector_norm(v)) for k, v in oracle.items()},
        "findings": [f.code for f in t.findings],
    }


def scenario_desync(rank: int) -> dict[str, Any]:
    """Rank 1 rescales .grad after the all-reduce: the merged report flags the disagreement."""
    ddp = DDP(_model())
    with gradprobe.trace(ddp, on_finding="record") as t:
        a, b = ddp(batch(rank, 0))
        (a.square().mean() + b.abs().mean()).backward()
        if rank == 1:
            ddp.module.head_a.weight.grad.mul_(2.0)
    merged = t.gather(dst=0)
    return {
        "rows": _rows(t),
        "merged": None if merged is None else (merged.to_dict(), _render(merged), [m.name for m in merged.disagreements]),
    }


def scenario_unused(rank: int, find_unused: bool) -> dict[str, Any]:
    """Only head_a's loss is backpropagated: head_b's parameters get no gradient."""
    ddp = DDP(_model(), find_unused_parameters=find_unused)
    with gradprobe.trace(ddp, on_finding="record") as t:
        a, _ = ddp(batch(rank, 0))
        loss_a = a.square().mean()
        loss_a.backward()
    error = None
    try:
        ddp(batch(rank, 1))
    except RuntimeError as exc:
        error = str(exc)
    indices = None
    if error is not None:
        m = re.search(r"did not receive grad for rank \d+: ([\d ]+)", error)
        indices = [int(i) for i in m.group(1).split()] if m else None
    return {
        "rows": _rows(t),
        "findings": [(f.code, f.message, f.data, f.site) for f in t.findings],
        "error": error,
        "error_indices": indices,
    }


def _render(obj: Any) -> str:
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(obj)
    return console.file.getvalue()  # type: ignore[attr-defined]


def run_all(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {
            "plain_stats": scenario_plain(rank, "stats", False),
            "plain_tensors": scenario_plain(rank, "tensors", False),
            "bucket_view": scenario_plain(rank, "tensors", True),
            "two_steps": scenario_two_steps(rank, False),
            "two_steps_bv": scenario_two_steps(rank, True),
            "no_sync": scenario_no_sync(rank),
            "desync": scenario_desync(rank),
            "unused_clean": scenario_unused(rank, True),
            "unused": scenario_unused(rank, False),  # last: it leaves DDP's reducer broken, on purpose
        }
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        # Tear down in order (as examples/ddp_two_ranks.py): the DDP modules, one with a reducer left
        # broken on purpose, go while the process group lives; no rank destroys the group while the
        # other still uses it (gloo's barrier waits for all earlier work).
        del results
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
