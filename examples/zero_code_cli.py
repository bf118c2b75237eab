"""Zero-code tracing: run an unchanged training script under gradprobe from the command line.

    gradprobe run train.py --epochs 1            # or: python -m gradprobe run train.py ...
    gradprobe run --json out.json --html out.html train.py

This example writes a small two-loss training script to a temporary folder and runs it exactly as
the command line would (`gradprobe.integrations.cli.main`), so the report below is what the terminal shows.
"""

import tempfile
import textwrap
from pathlib import Path

from gradprobe.integrations.cli import main

TRAIN = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
    head_cls, head_reg = nn.Linear(16, 3), nn.Linear(16, 1)
    params = [*encoder.parameters(), *head_cls.parameters(), *head_reg.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    epochs = int(sys.argv[sys.argv.index("--epochs") + 1]) if "--epochs" in sys.argv else 1
    for _ in range(epochs):
        x, y, t = torch.randn(8, 6), torch.randint(0, 3, (8,)), torch.randn(8, 1)
        opt.zero_grad()
        features = encoder(x)
        loss_cls = nn.functional.cross_entropy(head_cls(features), y)
        loss_reg = nn.functional.mse_loss(head_reg(features), t)
        loss_cls.backward(retain_graph=True)
        loss_reg.backward()
        opt.step()
    """
)

with tempfile.TemporaryDirectory() as folder:
    script = Path(folder) / "train.py"
    script.write_text(TRAIN)
    status = main(["run", "--json", str(Path(folder) / "out.json"), str(script), "--epochs", "1"])
    print("exit status:", status, "· JSON written:", (Path(folder) / "out.json").stat().st_size, "bytes")
