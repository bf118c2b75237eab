"""PyTorch Lightning: GradProbeCallback traces the whole run under one trace and prints the report every N steps.

    pip install 'gradprobe[lightning]'
    python examples/lightning_callback.py

Without Lightning installed it says so and traces one plain PyTorch step instead.
"""

import torch
from torch import nn

import gradprobe

try:
    import lightning.pytorch as pl
except ImportError:
    pl = None


def main():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(80, 4), torch.randn(80, 2))
    if pl is None:
        print("PyTorch Lightning is not installed (pip install 'gradprobe[lightning]'); one plain traced step:")
        net = nn.Linear(4, 2)
        x, y = data[:4]
        with gradprobe.trace(net) as t:
            nn.functional.mse_loss(net(x), y).backward()
        t.report()
        return

    from gradprobe.integrations.lightning import GradProbeCallback

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[GradProbeCallback(every_n_steps=10)],
    )
    trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=4))


if __name__ == "__main__":
    main()
