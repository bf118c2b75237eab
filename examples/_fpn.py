"""The FPN-style detector the examples share: a two-level feature pyramid, class and box heads."""

import torch.nn.functional as F
from torch import nn


class TinyFPN(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.lateral = nn.Conv2d(width, width, 1)
        self.cls_head = nn.Conv2d(width, num_classes, 3, padding=1)
        self.box_head = nn.Conv2d(width, 4, 3, padding=1)

    def forward(self, x):
        p3 = self.stem(x)
        p4 = self.down(p3)
        p3 = p3 + F.interpolate(self.lateral(p4), size=p3.shape[-2:], mode="nearest")
        levels = [p3, p4]
        return [self.cls_head(p) for p in levels], [self.box_head(p) for p in levels]


def losses(model, images, labels, boxes):
    cls_out, box_out = model(images)
    loss_cls = sum(F.cross_entropy(c, labels[: c.shape[-1]].expand(c.shape[0], c.shape[2], -1)) for c in cls_out)
    loss_box = sum(F.smooth_l1_loss(b, boxes[..., : b.shape[-2], : b.shape[-1]]) for b in box_out)
    return loss_cls, loss_box
