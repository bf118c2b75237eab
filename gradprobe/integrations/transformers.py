"""Hugging Face transformers: ``GradProbeCallback`` for ``Trainer`` (``pip install gradprobe[transformers]``).

Example::

    from gradprobe.integrations.transformers import GradProbeCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[GradProbeCallback(every_n_steps=100)])

Each optimizer step (``on_step_begin`` → ``on_pre_optimizer_step``: the forward and backward of every
gradient-accumulation micro-batch, and gradient clipping) runs under its own trace of the model; it
closes before ``optimizer.step()`` and ``model.zero_grad()``, so the report sees the step's ``.grad``.
Clipping (``max_grad_norm``, on by default) rescales ``.grad`` in place, which the breakdown shows as
modified outside backward.
Findings are logged as soon as the step ends; the full report every ``every_n_steps`` steps.
``callback.last`` is the last step's trace, ``callback.findings`` every finding as ``(step, finding)``.
"""

from __future__ import annotations

from typing import Any

from gradprobe.integrations.steps import StepCallback

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        "gradprobe.integrations.transformers needs Hugging Face transformers: "
        "pip install 'gradprobe[transformers]' (or pip install transformers accelerate)"
    ) from exc

__all__ = ["GradProbeCallback"]


class GradProbeCallback(StepCallback, TrainerCallback):  # type: ignore[misc]
    """Trace each training step; log findings at once and the report every ``every_n_steps`` steps.

    Args: see :class:`gradprobe.integrations.steps.StepCallback` (``every_n_steps``, ``keep``,
    ``on_finding``, ``console``, ``log``, ``plugins``, ``disable``).
    """

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            self._steps.begin(model)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Trainer calls model.zero_grad() before on_step_end: close the trace while .grad still holds the step
        self._steps.close()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._steps.end(int(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._steps.close()
