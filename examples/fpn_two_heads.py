"""A shared-trunk detector with a classification and a box-regression head (FPN style).

    python examples/fpn_two_heads.py

The same step done two ways gives the same gradients:
  1. one backward per loss:  loss_cls.backward(retain_graph=True); loss_box.backward()
  2. one backward of the sum: (loss_cls + loss_box).backward()
The first report splits every parameter's .grad into the part each loss added; the second shows one
part per parameter (use trace(..., decompose=True) to split that one by loss too).
"""

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe


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


torch.manual_seed(0)
model = TinyFPN()
images = torch.randn(2, 3, 16, 16)
labels = torch.randint(0, 3, (16,))
boxes = torch.randn(2, 4, 16, 16)

with gradprobe.trace(model) as t:
    loss_cls, loss_box = losses(model, images, labels, boxes)
    loss_cls.backward(retain_graph=True)
    loss_box.backward()
t.report()
separate = {name: p.grad.clone() for name, p in model.named_parameters()}

model.zero_grad()
with gradprobe.trace(model) as t2:
    loss_cls, loss_box = losses(model, images, labels, boxes)
    (loss_cls + loss_box).backward()
t2.report()

same = all(torch.allclose(separate[n], p.grad, atol=1e-6) for n, p in model.named_parameters())
print("both ways give the same final gradients:", same)
