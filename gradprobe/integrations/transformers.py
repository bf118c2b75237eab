"""Hugging Face transformers: ``GradProbeCallback`` for ``Trainer`` (``pip install gradprobe[transformers]``).

Example::

    from gradprobe.integrations.transformers import GradProbeCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[GradProbeCallback(every_n_steps=100)])

One trace of the model is entered at ``on_train_begin`` and exited at ``on_train_end``; the trace ends
a step at each ``optimizer.step()`` (NOTE [one trace per run] in ``gradprobe/integrations/steps.py``),
so every gradient-accumulation micro-batch of a step is one backward call of that step. Clipping
(``max_grad_norm``, on by default) rescales ``.grad`` in place, which the breakdown shows as modified
outside backward. Findings are logged at the ``on_optimizer_step`` of the step they appear in (after
``optimizer.step()``, before ``model.zero_grad()``, so a report there still sees the step's ``.grad``),
with the trace's step number (counted from 0); the full report every ``every_n_steps`` steps of the
Trainer and at the end.
``callback.trace`` is the run's trace, ``callback.findings`` every finding as ``(step, finding)``.

Trainer has no exception event: when ``trainer.train()`` raises, the trace stays open until
``callback.close()``, the next ``trainer.train()``, or the callback being freed; to end it at once::

    try:
        trainer.train()
    finally:
        callback.close()
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
    """Trace the training run; log findings at once, the report every ``every_n_steps`` steps and at the end.

    Args: see :class:`gradprobe.integrations.steps.StepCallback` (``every_n_steps``, ``keep``,
    ``on_finding``, ``console``, ``log``, ``plugins``, ``disable``, ``window``, ``live``).
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            self._steps.start(model, int(state.global_step))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # after optimizer.step(), before model.zero_grad(): the report still sees the step's .grad;
        # Trainer adds 1 to global_step just after this event
        self._steps.step_end(int(state.global_step) + 1)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the same count as at on_optimizer_step: only findings made since (during zero_grad) are logged;
        # an older Trainer without the on_optimizer_step event steps and reports here
        self._steps.step_end(int(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._steps.finish()
