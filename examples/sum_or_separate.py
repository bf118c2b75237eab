"""Sum the losses, or backward each? Both give the same per-loss parts; gradprobe shows it.

    python examples/sum_or_separate.py

An FPN-style detector with a classification and a box-regression head, one training step done twice:
  1. one backward per loss:      loss_cls.backward(retain_graph=True); loss_box.backward()
     -> gradprobe records the part each backward call added to every parameter's .grad
  2. one backward of the sum:    (loss_cls + loss_box).backward()   under trace(..., decompose=True)
     -> gradprobe splits that single backward into the part each loss added
The two reports show the same parts, shares and cosines; the last lines check it number by number.
"""

import torch

import gradprobe
from _fpn import TinyFPN, losses  # the shared model (examples/_fpn.py)

torch.manual_seed(0)
model = TinyFPN()
images = torch.randn(2, 3, 16, 16)
labels = torch.randint(0, 3, (16,))
boxes = torch.randn(2, 4, 16, 16)

print("1. One backward per loss\n")
with gradprobe.trace(model, keep="tensors") as separate:
    loss_cls, loss_box = losses(model, images, labels, boxes)
    separate.name(loss_cls, "cls")
    separate.name(loss_box, "box")
    loss_cls.backward(retain_graph=True)
    loss_box.backward()
separate.report()

model.zero_grad(set_to_none=True)
print("\n2. One backward of the sum, decomposed\n")
with gradprobe.trace(model, keep="tensors", decompose=True) as summed:
    loss_cls, loss_box = losses(model, images, labels, boxes)
    summed.losses({"cls": loss_cls, "box": loss_box})
    (loss_cls + loss_box).backward()
summed.report()

per_call = [s for s in separate.splits() if s.kind == "per-backward"][0]
decomposed = [s for s in summed.splits() if s.kind == "decomposed"][0]
worst = 0.0
for a, b in zip(per_call.leaves, decomposed.leaves):
    for pa, pb in zip(a.parts, b.parts):
        scale = max(float(pa.abs().max()), 1e-12)
        worst = max(worst, float((pa - pb).abs().max()) / scale)
print(f"\nper-loss parts, separate backwards vs one decomposed backward: largest relative difference {worst:.1e}")
print("the same parts both ways:", worst < 1e-4, "· the decomposed parts add up to the backward:", decomposed.check)
