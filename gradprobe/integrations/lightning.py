"""PyTorch Lightning: ``GradProbeCallback`` traces every training step (``pip install gradprobe[lightning]``).

Example::

    from gradprobe.integrations.lightning import GradProbeCallback

    trainer = lightning.Trainer(callbacks=[GradProbeCallback(every_n_steps=100)])

Each training batch (``on_train_batch_start`` → ``on_train_batch_end``: forward, ``backward``,
optimizer step) runs under its own trace of the LightningModule. Findings are logged as soon as the
batch ends; the full report every ``every_n_steps`` optimizer steps. ``callback.last`` is the trace of
the last batch, ``callback.findings`` every finding of the run as ``(step, finding)``.
"""

from __future__ import annotations

from typing import Any

from gradprobe.integrations.steps import StepCallback

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    try:
        from pytorch_lightning import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "gradprobe.integrations.lightning needs PyTorch Lightning: pip install 'gradprobe[lightning]' "
            "(or pip install lightning)"
        ) from exc

__all__ = ["GradProbeCallback"]


class GradProbeCallback(StepCallback, Callback):  # type: ignore[misc]
    """Trace each training batch; log findings at once and the report every ``every_n_steps`` steps.

    Args: see :class:`gradprobe.integrations.steps.StepCallback` (``every_n_steps``, ``keep``,
    ``on_finding``, ``console``, ``log``, ``plugins``, ``disable``).
    """

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._steps.begin(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._steps.end(int(trainer.global_step))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._steps.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._steps.close(exception)
