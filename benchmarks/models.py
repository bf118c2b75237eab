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


# -- models with several losses, for benchmarks/decompose.py (per-loss splits) -------------------


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class FPNDetector(nn.Module):
    """A RetinaNet/FCOS-style detector: conv+BN backbone (3 stages), FPN (lateral + top-down), three
    pyramid levels, shared class / box / centerness towers and an auxiliary segmentation head."""

    def __init__(self, width: int = 32, classes: int = 8) -> None:
        super().__init__()
        self.stem = _ConvBN(3, width, 2)
        self.c3 = nn.Sequential(_ConvBN(width, width), _ConvBN(width, width, 2))
        self.c4 = nn.Sequential(_ConvBN(width, 2 * width), _ConvBN(2 * width, 2 * width, 2))
        self.c5 = nn.Sequential(_ConvBN(2 * width, 4 * width), _ConvBN(4 * width, 4 * width, 2))
        self.lat = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (width, 2 * width, 4 * width))
        self.out = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(3))
        self.cls_tower = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU())
        self.box_tower = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU())
        self.cls = nn.Conv2d(width, classes, 3, padding=1)
        self.box = nn.Conv2d(width, 4, 3, padding=1)
        self.ctr = nn.Conv2d(width, 1, 3, padding=1)
        self.seg = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p5 = self.lat[2](c5)
        p4 = self.lat[1](c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.lat[0](c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        levels = [conv(p) for conv, p in zip(self.out, (p3, p4, p5))]
        ct = [self.cls_tower(p) for p in levels]
        bt = [self.box_tower(p) for p in levels]
        return {
            "cls": [self.cls(t) for t in ct],
            "box": [self.box(t) for t in bt],
            "ctr": [self.ctr(t) for t in bt],
            "seg": [self.seg(levels[0])],
        }


def _giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GIoU loss of (l, t, r, b) distance boxes (FCOS-style), mean over positions."""
    pl, pt, pr, pb = pred.relu().unbind(1)
    tl, tt, tr, tb = target.unbind(1)
    area_p = (pl + pr) * (pt + pb)
    area_t = (tl + tr) * (tt + tb)
    w = torch.minimum(pl, tl) + torch.minimum(pr, tr)
    h = torch.minimum(pt, tt) + torch.minimum(pb, tb)
    inter = w * h
    union = area_p + area_t - inter + 1e-6
    enclose = (torch.maximum(pl, tl) + torch.maximum(pr, tr)) * (torch.maximum(pt, tt) + torch.maximum(pb, tb)) + 1e-6
    giou = inter / union - (enclose - union) / enclose
    return (1 - giou).mean()


def fpn_losses(k: int, device: str = "cpu") -> tuple[nn.Module, Callable[[], dict[str, torch.Tensor]]]:
    """The FPN detector and a function giving its first ``k`` (2-5) losses: cls (sigmoid focal-style),
    box (smooth L1), centerness (BCE), GIoU, auxiliary segmentation (cross-entropy)."""
    torch.manual_seed(0)
    model = FPNDetector().to(device)
    images = torch.randn(2, 3, 128, 128, device=device)
    with torch.no_grad():
        shapes = [o.shape for o in model(images)["cls"]]
    cls_t = [(torch.rand(s, device=device) > 0.9).float() for s in shapes]
    box_t = [torch.rand(s[0], 4, *s[2:], device=device) * 4 + 0.5 for s in shapes]
    ctr_t = [torch.rand(s[0], 1, *s[2:], device=device) for s in shapes]
    seg_t = torch.randint(0, shapes[0][1], (shapes[0][0], *shapes[0][2:]), device=device)

    def losses() -> dict[str, torch.Tensor]:
        out = model(images)
        found: dict[str, torch.Tensor] = {}
        bce = [F.binary_cross_entropy_with_logits(c, t, reduction="none") for c, t in zip(out["cls"], cls_t)]
        found["cls"] = sum((b * (t - c.sigmoid()).abs().pow(2)).mean() for b, c, t in zip(bce, out["cls"], cls_t))  # type: ignore[assignment]
        found["box"] = sum(F.smooth_l1_loss(b, t) for b, t in zip(out["box"], box_t))  # type: ignore[assignment]
        found["ctr"] = sum(F.binary_cross_entropy_with_logits(c, t) for c, t in zip(out["ctr"], ctr_t))  # type: ignore[assignment]
        found["giou"] = sum(_giou_loss(b, t) for b, t in zip(out["box"], box_t))  # type: ignore[assignment]
        found["seg"] = F.cross_entropy(out["seg"][0], seg_t)
        return dict(list(found.items())[:k])

    return model, losses


class DecoderLM(nn.Module):
    """A GPT-style decoder (pre-norm blocks with SDPA) with an LM head, a pooled regression head and
    an auxiliary LM head shared by the intermediate blocks (deep supervision)."""

    def __init__(self, vocab: int = 512, d: int = 128, blocks: int = 4, heads: int = 4, ctx: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(_GPTBlock(d, heads) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)
        self.lm = nn.Linear(d, vocab, bias=False)
        self.aux = nn.Linear(d, vocab, bias=False)
        self.reg = nn.Linear(d, 1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.tok(tokens) + self.pos(pos)
        hidden = []
        for block in self.blocks:
            h = block(h)
            hidden.append(h)
        h = self.ln_f(h)
        return self.lm(h), [self.aux(x) for x in hidden[:-1]], self.reg(h.mean(1)).squeeze(-1)


def transformer_losses(k: int, device: str = "cpu") -> tuple[nn.Module, Callable[[], dict[str, torch.Tensor]]]:
    """The decoder and a function giving ``k`` (2-6) losses: LM, pooled regression, then auxiliary LM
    losses after blocks 3, 2, 1, and a logit-norm penalty."""
    torch.manual_seed(0)
    model = DecoderLM().to(device)
    tokens = torch.randint(0, 512, (8, 65), device=device)
    target = torch.randn(8, device=device)

    def losses() -> dict[str, torch.Tensor]:
        logits, aux, reg = model(tokens[:, :-1])
        y = tokens[:, 1:].reshape(-1)
        found = {"lm": F.cross_entropy(logits.reshape(-1, 512), y), "reg": F.mse_loss(reg, target)}
        for i, a in reversed(list(enumerate(aux))):
            found[f"aux{i + 1}"] = F.cross_entropy(a.reshape(-1, 512), y)
        found["z"] = 1e-4 * logits.logsumexp(-1).square().mean()
        return dict(list(found.items())[:k])

    return model, losses


DECOMPOSE_MODELS: dict[str, tuple[Callable[[int, str], tuple[nn.Module, Callable[[], dict[str, torch.Tensor]]]], range]] = {
    "fpn": (fpn_losses, range(2, 6)),
    "transformer": (transformer_losses, range(2, 7)),
}
