"""Lightning and Hugging Face callbacks, each with a tiny model built locally (skipped when not installed)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn


def _console() -> Console:
    return Console(file=io.StringIO(), width=120, color_system=None)


def test_lightning_callback_traces_each_step(tmp_path: Path) -> None:
    """Every training batch gets a trace of the LightningModule; report every N steps; findings logged at once."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradprobe.integrations.lightning import GradProbeCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 2)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 2))
    console, lines = _console(), []
    callback = GradProbeCallback(every_n_steps=2, console=console, log=lines.append)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path,
    )
    model = Tiny()
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    assert callback.reports == 2  # steps 2 and 4
    last = callback.last
    assert last is not None and not last.active and len(last.records) == 1
    rows = {row.leaf.name: row for row in last.breakdown()}
    # named under the script's `model` (NOTE [leaf names]: Lightning's frames are skipped)
    assert rows["model.net.weight"].reached and rows["model.net.weight"].check is True
    assert not rows["model.unused.weight"].reached
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "gradprobe · step 2" in text and "Gradient breakdown" in text
    assert lines.count("gradprobe report, step 2") == 1


def test_lightning_callback_logs_findings_immediately(tmp_path: Path) -> None:
    """A finding in a step is logged when that step ends, with its step number."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradprobe.findings import Finding
    from gradprobe.hookspecs import hookimpl
    from gradprobe.integrations.lightning import GradProbeCallback

    class Flag:
        @hookimpl
        def gradprobe_after_backward(self, trace, record, error):  # type: ignore[no-untyped-def]
            trace.emit(Finding("GP999", "demo", "warning", f"saw {record.name}"))

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    lines: list[str] = []
    callback = GradProbeCallback(every_n_steps=100, console=_console(), log=lines.append, plugins=(Flag,))
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path,
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4))
    assert [step for step, f in callback.findings] == [1, 2]
    assert [line.split(":")[0] for line in lines] == ["gradprobe step 1", "gradprobe step 2"]
    assert callback.reports == 0


def _tiny_bert():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50,
        max_position_embeddings=16, num_labels=2,
    )
    torch.manual_seed(0)
    return transformers, transformers.BertForSequenceClassification(config)


class _Dataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (8, 6), generator=g)
        self.labels = torch.randint(0, 2, (8,), generator=g)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": self.labels[i]}


def test_transformers_callback_traces_each_step(tmp_path: Path) -> None:
    """HF Trainer on a tiny local BERT: each step traced, two micro-batches as two parts; clipping is visible."""
    transformers, model = _tiny_bert()
    from gradprobe.integrations.transformers import GradProbeCallback

    console, lines = _console(), []
    callback = GradProbeCallback(every_n_steps=2, console=console, log=lines.append)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, max_grad_norm=0.0,
        gradient_accumulation_steps=2,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Dataset(), callbacks=[callback])
    trainer.train()
    assert callback.reports == 1  # step 2
    last = callback.last
    assert last is not None and len(last.records) == 2  # two micro-batches, one optimizer step
    rows = {row.leaf.name: row for row in last.breakdown()}
    row = rows["model.classifier.weight"]  # under the test's `model`: the Trainer's frames are skipped
    assert [p.record for p in row.parts] == [0, 1] and row.grad_norm is not None
    # Trainer always runs clip_grad_norm_ (with max_norm=inf when max_grad_norm=0, to log the norm): an
    # in-place ×1 write after the last backward, which the Σ check honestly reports as a modification
    assert row.check is False and "modified outside backward" in row.note
    assert "gradprobe · step 2" in console.file.getvalue()  # type: ignore[attr-defined]


def test_callbacks_reject_bad_every_n_steps() -> None:
    """every_n_steps below 1 is refused with a clear message."""
    from gradprobe.integrations.steps import StepTracer

    with pytest.raises(ValueError, match="every_n_steps"):
        StepTracer(0, "stats", "record", None, None, (), ())
