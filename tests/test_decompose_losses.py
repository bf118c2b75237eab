"""Losses found without naming: loss functions outside torch.nn.functional, and one call site reached often."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.analysis import losses as losses_module


@pytest.fixture(autouse=True)
def _fresh_graph_cache():
    from gradprobe.analysis import strategy

    strategy._GRAPHS.clear()
    yield
    strategy._GRAPHS.clear()


def sigmoid_focal_loss(inputs, targets, alpha: float = 0.25, gamma: float = 2, reduction: str = "none"):
    """torchvision.ops.sigmoid_focal_loss, as written there (torchvision does not import beside torch 2.13)."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


def generalized_box_iou_loss(boxes1, boxes2, reduction: str = "none", eps: float = 1e-7):
    """torchvision.ops.generalized_box_iou_loss, shortened (x1, y1, x2, y2 boxes)."""
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    xkis1, ykis1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xkis2, ykis2 = torch.min(x2, x2g), torch.min(y2, y2g)
    intsctk = torch.zeros_like(x1)
    mask = (ykis2 > ykis1) & (xkis2 > xkis1)
    intsctk[mask] = (xkis2[mask] - xkis1[mask]) * (ykis2[mask] - ykis1[mask])
    unionk = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsctk
    iouk = intsctk / (unionk + eps)
    area_c = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    loss = 1 - (iouk - ((area_c - unionk) / (area_c + eps)))
    if reduction == "mean":
        loss = loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(6, 16)
        self.cls = nn.Linear(16, 3)
        self.box = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        b = self.box(h)
        return self.cls(h), torch.cat([b[:, :2], b[:, :2] + b[:, 2:].exp()], 1)


def _components(t):
    (split,) = [s for s in t.splits() if s.kind == "decomposed"]
    return split


def test_focal_and_giou_losses_are_found_without_naming():
    """torchvision-style sigmoid_focal_loss and generalized_box_iou_loss are components, not (rest)."""
    model = Head()
    x = torch.randn(5, 6)
    targets = (torch.rand(5, 3) > 0.5).float()
    gt = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(5, 4)
    with gradprobe.trace(model, decompose=True, keep="tensors", on_finding="record") as t:
        cls, box = model(x)
        focal = sigmoid_focal_loss(cls, targets, reduction="mean")
        giou = generalized_box_iou_loss(box, gt, reduction="mean")
        line = __import__("inspect").currentframe().f_lineno - 2
        l1 = F.smooth_l1_loss(box, gt)
        (focal + 2 * giou + l1).backward()
    split = _components(t)
    assert split.losses == (
        f"sigmoid_focal_loss@test_decompose_losses.py:{line}",
        f"generalized_box_iou_loss@test_decompose_losses.py:{line + 1}",
        f"smooth_l1_loss@test_decompose_losses.py:{line + 3}",
    ), split.losses
    assert "(rest)" not in split.losses and split.check is True
    assert split.leaf("cls.weight").reached == (True, False, False)


def test_one_call_site_in_a_loop_is_one_loss_with_a_count():
    """A loss computed per pyramid level in a loop is one component 'name ×3'; naming splits it."""
    model = Head()
    x = torch.randn(5, 6)
    y = torch.zeros(5, dtype=torch.long)

    def per_level(cls):
        return [F.cross_entropy(cls * s, y) for s in (1.0, 0.5, 0.25)]

    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        cls, box = model(x)
        levels = per_level(cls)
        (sum(levels) + box.square().mean()).backward()
    split = _components(t)
    assert split.losses[0].startswith("cross_entropy@test_decompose_losses.py:") and split.losses[0].endswith(" ×3")
    assert split.losses[-1] == "(rest)"
    with gradprobe.trace(model, decompose=True, on_finding="record") as named:
        cls, box = model(x)
        levels = named.losses({f"level{i}": loss for i, loss in enumerate(per_level(cls))})
        (sum(levels.values()) + box.square().mean()).backward()
    assert _components(named).losses[:3] == ("level0", "level1", "level2")


def test_final_and_auxiliary_calls_of_one_loss_line_stay_apart():
    """DETR-style: the same loss function called for the last layer and, from another place, per
    auxiliary layer, gives two components (the auxiliary one counted), not one merged loss."""
    model = Head()
    x = torch.randn(5, 6)
    y = torch.zeros(5, dtype=torch.long)

    def loss_labels(logits):
        return F.cross_entropy(logits, y)

    with gradprobe.trace(model, decompose=True, on_finding="record") as t:
        cls, _ = model(x)
        final = loss_labels(cls)
        aux = [loss_labels(cls * (i + 2)) for i in range(2)]
        (final + sum(aux)).backward()
    split = _components(t)
    assert len(split.losses) == 2, split.losses
    assert not split.losses[0].endswith("×2") and split.losses[1].endswith(" ×2")


def test_plugins_register_their_own_loss_functions():
    """register_loss adds a loss function (by object or name) the registry did not know."""

    def my_margin(a, b):
        return (a - b).clamp_min(0).mean()

    model = Head()
    x = torch.randn(5, 6)
    try:
        for registered in (False, True):
            if registered:
                losses_module.register_loss(my_margin)
            with gradprobe.trace(model, decompose=True, on_finding="record") as t:
                cls, box = model(x)
                (my_margin(cls, torch.zeros_like(cls)) + F.mse_loss(box, torch.zeros_like(box))).backward()
            names = _components(t).losses
            assert any(n.startswith("my_margin@") for n in names) == registered, names
    finally:
        losses_module.LOSS_CODE_NAMES.discard("my_margin")
    with pytest.raises(TypeError):
        losses_module.register_loss(3)  # type: ignore[arg-type]


def test_loss_watch_leaves_with_the_trace():
    """The loss watch (a TorchFunctionMode) is entered with a decomposing trace and gone after it."""
    from torch.overrides import _get_current_function_mode_stack

    from gradprobe.analysis.loss_watch import LossWatch

    with gradprobe.trace(decompose=True):
        assert any(isinstance(m, LossWatch) for m in _get_current_function_mode_stack())
    assert not any(isinstance(m, LossWatch) for m in _get_current_function_mode_stack())
    with gradprobe.trace():
        assert not any(isinstance(m, LossWatch) for m in _get_current_function_mode_stack())
