"""A shared-trunk detector with a classification and a box-regression head (FPN style).

    python examples/fpn_two_heads.py

The same step done two ways gives the same gradients:
  1. one backward per loss:  loss_cls.backward(retain_graph=True); loss_box.backward()
  2. one backward of the sum: (loss_cls + loss_box).backward()
The first report splits every parameter's .grad into the part each loss added; the second shows one
part per parameter (use trace(..., decompose=True) to split that one by loss too).
"""

import torch

import gradprobe
from _fpn import TinyFPN, losses  # the shared model (examples/_fpn.py)

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
