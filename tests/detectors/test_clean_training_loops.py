"""Zero false alarms on clean training loops, with every detector on: the loops issue 12 names.

Gradient accumulation, a GAN, actor-critic, a truncated-BPTT RNN, a multi-task loop (sum of losses and
separate retained backward calls), an AMP loop with logging after unscale_, and a frozen backbone; each
written correctly, several steps long, under `detect="default"` and `detect="all"`.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe


def grad_accumulation(detect: str) -> gradprobe.Trace:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    accum, running = 4, 0.0
    with gradprobe.trace(model, on_finding="record", detect=detect) as t:
        for i in range(12):
            x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
            loss = F.cross_entropy(model(x), y) / accum
            loss.backward()
            running += loss.item()
            if (i + 1) % accum == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
    return t


def gan(detect: str) -> gradprobe.Trace:
    G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6))
    D = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_losses, g_losses = [], []
    with gradprobe.trace(G, D, on_finding="record", detect=detect) as t:
        for _ in range(4):
            real, z = torch.randn(8, 6), torch.randn(8, 4)
            fake = G(z)
            opt_d.zero_grad()
            d_loss = F.binary_cross_entropy_with_logits(D(real), torch.ones(8, 1)) + F.binary_cross_entropy_with_logits(
                D(fake.detach()), torch.zeros(8, 1)
            )
            d_loss.backward()
            opt_d.step()
            opt_g.zero_grad()
            g_loss = F.binary_cross_entropy_with_logits(D(fake), torch.ones(8, 1))
            g_loss.backward()
            opt_g.step()
            d_losses.append(d_loss.item())
            g_losses.append(g_loss.detach())
    return t


def actor_critic(detect: str) -> gradprobe.Trace:
    actor = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
    critic = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=1e-3)
    with gradprobe.trace(actor, critic, on_finding="record", detect=detect) as t:
        for _ in range(4):
            states = torch.randn(16, 4)
            dist = torch.distributions.Categorical(logits=actor(states))
            actions = dist.sample()
            rewards = torch.randn(16)
            values = critic(states).squeeze(-1)
            with torch.no_grad():
                next_values = critic(torch.randn(16, 4)).squeeze(-1)
            advantage = rewards + 0.99 * next_values - values
            actor_loss = -(dist.log_prob(actions) * advantage.detach()).mean()
            critic_loss = advantage.pow(2).mean()
            opt.zero_grad()
            (actor_loss + 0.5 * critic_loss - 0.01 * dist.entropy().mean()).backward()
            opt.step()
    return t


def tbptt_rnn(detect: str) -> gradprobe.Trace:
    rnn, head = nn.GRU(3, 8, batch_first=True), nn.Linear(8, 1)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    h = torch.zeros(1, 2, 8)
    with gradprobe.trace(model, on_finding="record", detect=detect) as t:
        for _ in range(5):
            h = h.detach()
            out, h = rnn(torch.randn(2, 6, 3), h)
            loss = head(out).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return t


def multi_task(detect: str) -> gradprobe.Trace:
    trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    heads = nn.ModuleDict({"cls": nn.Linear(16, 3), "reg": nn.Linear(16, 1)})
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log = {"cls": [], "reg": []}
    with gradprobe.trace(model, on_finding="record", detect=detect) as t:
        for step in range(4):
            feats = trunk(torch.randn(8, 8))
            l_cls = F.cross_entropy(heads["cls"](feats), torch.randint(0, 3, (8,)))
            l_reg = F.mse_loss(heads["reg"](feats), torch.randn(8, 1))
            opt.zero_grad()
            if step % 2:
                (l_cls + 0.5 * l_reg).backward()
            else:  # separate backward calls through the shared trunk
                l_cls.backward(retain_graph=True)
                (0.5 * l_reg).backward()
            opt.step()
            log["cls"].append(l_cls.item())
            log["reg"].append(l_reg.detach())
    return t


def amp_loop(detect: str) -> gradprobe.Trace:
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with gradprobe.trace(model, on_finding="record", detect=detect) as t:
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(torch.randn(8, 4))
            scaler.scale(out.float().pow(2).mean()).backward()
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            _ = [p.grad.norm() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
    assert norm is not None
    return t


def frozen_backbone(detect: str) -> gradprobe.Trace:
    backbone, head = nn.Linear(8, 16), nn.Linear(16, 2)
    backbone.requires_grad_(False)
    model = nn.Sequential(backbone, nn.ReLU(), head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    with gradprobe.trace(model, on_finding="record", detect=detect) as t:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
    return t


LOOPS: dict[str, Callable[[str], gradprobe.Trace]] = {
    "grad_accumulation": grad_accumulation,
    "gan": gan,
    "actor_critic": actor_critic,
    "tbptt_rnn": tbptt_rnn,
    "multi_task": multi_task,
    "amp": amp_loop,
    "frozen_backbone": frozen_backbone,
}


@pytest.mark.parametrize("detect", ["default", "all"])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_clean_loop_has_no_finding(loop: str, detect: str) -> None:
    """A correct training loop: no warning or error from any detector."""
    t = LOOPS[loop](detect)
    problems = [f.format() for f in t.findings if f.severity != "info"]
    assert problems == []
    assert len(t.records) >= 3
