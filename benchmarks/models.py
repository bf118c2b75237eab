"""Benchmark models: each builder returns a :class:`Workload` whose ``step`` is one training step.

A step is what a user wraps in ``gradprobe.trace(...)``: forward, two losses summed (so that
``decompose=True`` has something to split), one or more backward calls. Sizes are picked so that an
untraced step takes a few milliseconds to a few tens of milliseconds on a 2-core CPU: large enough to
be real work, small enough that gradprobe's per-leaf and per-call costs are not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "Workload", "build", "multi_backward", "wide"]


@dataclass
class Workload:
    """A model, its inputs and a training step (forward + backward, grads reset to None first)."""

    name: str
    model: nn.Module
    step: Callable[[], None]
    inputs: tuple[torch.Tensor, ...]
    backwards: int = 1

    def reset(self) -> None:
        """Free the gradients the last step left (as the next step would)."""
        for p in self.model.parameters():
            p.grad = None

    @property
    def tensors(self) -> int:
        return sum(1 for p in self.model.parameters() if p.requires_grad)

    @property
    def resident_bytes(self) -> int:
        """Bytes alive before a step starts: parameters, buffers, inputs (grads are reset to None)."""
        own = [*self.model.parameters(), *self.model.buffers(), *self.inputs]
        return sum(t.numel() * t.element_size() for t in own)


def _loss_step(name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...], losses: Callable[[], torch.Tensor]) -> Workload:
    def step() -> None:
        for p in model.parameters():
            p.grad = None
        losses().backward()

    return Workload(name, model, step, inputs)


# -- the models ------------------------------------------------------------------------------


def mlp(device: str) -> Workload:
    model = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 10),
    ).to(device)
    x = torch.randn(64, 512, device=device)
    y = torch.randint(0, 10, (64,), device=device)

    def losses() -> torch.Tensor:
        out = model(x)
        return F.cross_entropy(out, y) + 1e-3 * out.square().mean()

    return _loss_step("MLP", model, (x, y), losses)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class ResNet(nn.Module):
    """A ResNet-18-shaped CNN at CIFAR size: 4 stages of 2 basic blocks."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, c = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            for j in range(2):
                blocks.append(_Block(c, width * mult, 2 if (i > 0 and j == 0) else 1))
                c = width * mult
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)
        self.aux = nn.Linear(c, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks(self.stem(x)).mean((2, 3))
        return self.head(h), self.aux(h)


def cnn(device: str) -> Workload:
    model = ResNet().to(device)
    x = torch.randn(16, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (16,), device=device)

    def losses() -> torch.Tensor:
        logits, aux = model(x)
        return F.cross_entropy(logits, y) + aux.square().mean()

    return _loss_step("ResNet CNN", model, (x, y), losses)


class _LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 128)
        self.lstm = nn.LSTM(128, 256, num_layers=2, batch_first=True)
        self.head = nn.Linear(256, 1000)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def lstm(device: str) -> Workload:
    model = _LSTMNet().to(device)
    tokens = torch.randint(0, 1000, (16, 33), device=device)

    def losses() -> torch.Tensor:
        logits = model(tokens[:, :-1])
        lm = F.cross_entropy(logits.reshape(-1, 1000), tokens[:, 1:].reshape(-1))
        return lm + 1e-3 * logits.square().mean()

    return _loss_step("LSTM", model, (tokens,), losses)


class _GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm causal blocks, tied LM head."""

    def __init__(self, vocab: int = 512, d: int = 128, blocks: int = 10, heads: int = 4, ctx: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*(_GPTBlock(d, heads) for _ in range(blocks)))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.ln_f(self.blocks(self.tok(tokens) + self.pos(pos)))
        return h @ self.tok.weight.t()


def transformer(device: str) -> Workload:
    model = GPT().to(device)
    tokens = torch.randint(0, 512, (8, 65), device=device)

    def losses() -> torch.Tensor:
        logits = model(tokens[:, :-1])
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        return lm + 1e-4 * logits.square().mean()

    return _loss_step("GPT transformer", model, (tokens,), losses)


class Wide(nn.Module):
    """``tensors // 2`` small parallel Linear branches: per-leaf costs dominate everything else."""

    def __init__(self, tensors: int, d: int = 16) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(d, d) for _ in range(tensors // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(0)


def wide(device: str, tensors: int = 1000) -> Workload:
    model = Wide(tensors).to(device)
    x = torch.randn(8, 16, device=device)

    def losses() -> torch.Tensor:
        out = model(x)
        return out.square().mean() + out.mean()

    return _loss_step(f"wide ({tensors} tensors)", model, (x,), losses)


def multi_backward(device: str, calls: int) -> Workload:
    """One forward of the 1,000-tensor wide model, then ``calls`` backward calls (one per loss)."""
    model = Wide(1000).to(device)
    x = torch.randn(8, 16, device=device)

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        out = model(x)
        for i in range(calls):
            out[:, i::calls].square().mean().backward(retain_graph=i < calls - 1)

    return Workload(f"wide, {calls} backward", model, step, (x,), backwards=calls)


MODELS: dict[str, Callable[[str], Workload]] = {
    "mlp": mlp,
    "cnn": cnn,
    "lstm": lstm,
    "transformer": transformer,
    "wide": wide,
}


def build(name: str, device: str = "cpu") -> Workload:
    torch.manual_seed(0)
    return MODELS[name](device)
