"""Small models for tests: the shapes of real multi-loss training, at toy sizes (no downloads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TinyFPNDetector(nn.Module):
    """A backbone with two pyramid levels and shared classification / box-regression heads."""

    def __init__(self, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.lateral = nn.Conv2d(width, width, 1)
        self.cls_head = nn.Conv2d(width, num_classes, 3, padding=1)
        self.box_head = nn.Conv2d(width, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        p3 = self.stem(x)
        p4 = self.down(p3)
        p3 = p3 + F.interpolate(self.lateral(p4), size=p3.shape[-2:], mode="nearest")
        levels = [p3, p4]
        return [self.cls_head(p) for p in levels], [self.box_head(p) for p in levels]

    def losses(self, x: torch.Tensor, cls_target: int = 1) -> dict[str, torch.Tensor]:
        cls_out, box_out = self(x)
        loss_cls = sum(F.cross_entropy(c, torch.full(c.shape[:1] + c.shape[2:], cls_target)) for c in cls_out)
        loss_box = sum(F.smooth_l1_loss(b, torch.zeros_like(b)) for b in box_out)
        return {"cls": loss_cls, "box": loss_box}  # type: ignore[dict-item]


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.head_a = nn.Linear(12, 3)
        self.head_b = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"a": self.head_a(h), "b": self.head_b(h)}


class Generator(nn.Module):
    def __init__(self, z: int = 4, d: int = 6) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z, 8), nn.ReLU(), nn.Linear(8, d))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyLSTM(nn.Module):
    def __init__(self, d: int = 5, hidden: int = 7) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.lstm(x, state)
        return self.head(out[:, -1]), state


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 16, layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.lm_head = nn.Linear(d, vocab)
        self.cls_head = nn.Linear(d, 2)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(self.embed(tokens))
        return self.lm_head(h), self.cls_head(h[:, 0])


def seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
