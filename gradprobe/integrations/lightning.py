"""PyTorch Lightning: ``GradProbeCallback`` traces a whole training run (``pip install gradprobe[lightning]``).

Example::

    from gradprobe.integrations.lightning import GradProbeCallback

    trainer = lightning.Trainer(callbacks=[GradProbeCallback(every_n_steps=100)])

One trace of the LightningModule is entered at ``on_train_start`` and exited at ``on_train_end`` (or at
``on_exception``, also for a KeyboardInterrupt); the trace ends a step at each ``optimizer.step()``
(NOTE [one trace per run] in ``gradprobe/integrations/steps.py``). Findings are logged at the
``on_train_batch_end`` of the batch they appear in, with the trace's step number (counted from 0, as in
the report); the full report when the trainer's ``global_step`` is a multiple of ``every_n_steps``, and
at the end. ``callback.trace`` is the run's trace,
``callback.findings`` every finding of the run as ``(step, finding)``.
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
    """Trace the training run; log findings at once, the report every ``every_n_steps`` steps and at the end.

    Args: see :class:`gradprobe.integrations.steps.StepCallback` (``every_n_steps``, ``keep``,
    ``on_finding``, ``console``, ``log``, ``plugins``, ``disable``, ``window``, ``live``).
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._steps.start(pl_module, int(trainer.global_step))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._steps.step_end(int(trainer.global_step))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._steps.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._steps.finish(exception)
