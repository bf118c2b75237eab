"""Lightning and Hugging Face callbacks: the real libraries on tiny local models (skipped when not installed), and
fake trainers that call the callbacks in each framework's order of events (one trace per run, every exit path)."""

from __future__ import annotations

import gc
import io
import sys
import types
import weakref
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from rich.console import Console
from torch import nn

import gradprobe
from gradprobe.api.trace import Trace


def _console() -> Console:
    return Console(file=io.StringIO(), width=120, color_system=None)


def test_lightning_callback_traces_the_run(tmp_path: Path) -> None:
    """One trace of the LightningModule for the run; report every N steps and at the end; findings logged at once."""
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
    assert callback.reports == 3  # steps 2 and 4, and the end (GP503 for `unused` comes at the end)
    last = callback.trace
    assert last is not None and last is callback.last and not last.active
    rows = {row.leaf.name: row for row in last.breakdown()}
    # named under the script's `model` (NOTE [leaf names]: Lightning's frames are skipped)
    assert rows["model.net.weight"].reached and rows["model.net.weight"].check is True
    assert not rows["model.unused.weight"].reached
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "gradprobe · step 1" in text and "Gradient breakdown" in text  # steps count from 0, as in the report
    assert lines.count("gradprobe report, step 1") == 1 and lines[-1] == "gradprobe report, end of run (after step 3)"
    assert [line.split(":")[0] for line in lines if "GP503" in line] == ["gradprobe step 3"]  # the end-of-trace finding is dated to the last step


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
    assert [step for step, f in callback.findings] == [0, 1]
    assert [line.split(":")[0] for line in lines if "GP999" in line] == ["gradprobe step 0", "gradprobe step 1"]
    assert callback.reports == 1  # the end


@pytest.mark.parametrize("fail", ["error", "interrupt"])
def test_lightning_run_that_fails_leaves_no_hook(tmp_path: Path, fail: str) -> None:
    """Real Lightning: a training step that raises (or a Ctrl-C) reaches on_exception, which exits the run's trace."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradprobe.integrations.lightning import GradProbeCallback

    class Failing(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
            if batch_idx == 2:
                raise KeyboardInterrupt if fail == "interrupt" else RuntimeError("step 2 failed")
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    console = _console()
    callback = GradProbeCallback(every_n_steps=100, console=console, log=[].append)
    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path,
    )
    model = Failing()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 4)), batch_size=4)
    try:
        trainer.fit(model, data)
    except (RuntimeError, SystemExit):  # Lightning re-raises errors; after a Ctrl-C it shuts down gracefully
        pass
    run = callback.trace
    assert run is not None and not run.active and run.current_step == 2
    assert _left_installed(model) == []
    expected = "KeyboardInterrupt" if fail == "interrupt" else "RuntimeError"
    assert f"gradprobe · end of run (after step 1, stopped by {expected})" in console.file.getvalue()  # type: ignore[attr-defined]


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


def test_transformers_callback_traces_the_run(tmp_path: Path) -> None:
    """HF Trainer on a tiny local BERT: one trace for the run, two micro-batches per step; report at step 2 and the end."""
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
    assert callback.reports == 2  # step 2 and the end
    assert lines == ["gradprobe report, step 1", "gradprobe report, end of run (after step 2)"]
    run = callback.trace
    assert run is not None and not run.active and run.current_step == 3
    assert [r.step for r in run.records] == [0, 0, 1, 1, 2, 2]  # 3 steps × 2 micro-batches
    text = console.file.getvalue()  # type: ignore[attr-defined]
    mid_run = text[text.index("gradprobe · step 1\n") : text.index("gradprobe · end of run (after step 2)")]
    # reported at on_optimizer_step, before zero_grad: the latest step's breakdown with its .grad; Trainer
    # always runs clip_grad_norm_ (max_norm=inf when max_grad_norm=0, to log the norm): an in-place ×1
    # write after the last backward, which the Σ check honestly reports as a modification
    assert "step 1, the latest" in mid_run and ".grad was modified outside backward" in mid_run
    assert "classifier.weight" in mid_run and "The run · 2 steps (0–1)" in mid_run


# -- one trace per run, with fake frameworks (fast, and run where Lightning or transformers are not installed) --
#
# The fakes call the callbacks in the frameworks' own order of events (Lightning's automatic
# optimization: on_train_start, per batch on_train_batch_start → training_step → backward →
# optimizer.step() → on_train_batch_end, on_train_end or on_exception; HF Trainer: on_train_begin, per
# step on_step_begin → micro-batch backward calls → on_pre_optimizer_step → optimizer.step() →
# on_optimizer_step → zero_grad → global_step += 1 → on_step_end, on_train_end, and no exception event).


class _Hooks:
    """Every callback event a framework may call: all do nothing (the frameworks' base classes)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


@pytest.fixture
def fake_lightning(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``gradprobe.integrations.lightning`` imported against a fake ``lightning.pytorch``."""
    lightning, pytorch = types.ModuleType("lightning"), types.ModuleType("lightning.pytorch")
    pytorch.Callback = type("Callback", (_Hooks,), {})  # type: ignore[attr-defined]
    lightning.pytorch = pytorch  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lightning", lightning)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", pytorch)
    monkeypatch.delitem(sys.modules, "gradprobe.integrations.lightning", raising=False)
    import gradprobe.integrations.lightning as module

    monkeypatch.delitem(sys.modules, "gradprobe.integrations.lightning")  # the real one next time
    return module


@pytest.fixture
def fake_transformers(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``gradprobe.integrations.transformers`` imported against a fake ``transformers``."""
    transformers = types.ModuleType("transformers")
    transformers.TrainerCallback = type("TrainerCallback", (_Hooks,), {})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", transformers)
    monkeypatch.delitem(sys.modules, "gradprobe.integrations.transformers", raising=False)
    import gradprobe.integrations.transformers as module

    monkeypatch.delitem(sys.modules, "gradprobe.integrations.transformers")
    return module


class _TwoHeads(nn.Module):
    """A shared trunk and two heads, two losses summed into one backward per step (as a Lightning module)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.cls = nn.Linear(8, 3)
        self.reg = nn.Linear(8, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y, t = batch
        h = torch.relu(self.trunk(x))
        return nn.functional.cross_entropy(self.cls(h), y) + nn.functional.mse_loss(self.reg(h), t)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g), torch.randn(6, 1, generator=g)


class _Boom(Exception):
    pass


class FakeLightningTrainer:
    """Lightning's automatic optimization, reduced to its callback events and the optimizer step."""

    def __init__(self, callbacks: list[Any], max_steps: int, fail_at: int | None = None, fail: type[BaseException] = _Boom) -> None:
        self.callbacks, self.max_steps, self.fail_at, self.fail = callbacks, max_steps, fail_at, fail
        self.global_step = 0
        self.traces: list[Any] = []  # the callbacks' trace at each batch end, and whether it was active

    def _call(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def fit(self, module: _TwoHeads) -> None:
        optimizer = module.configure_optimizers()
        try:
            self._call("on_fit_start", module)
            self._call("on_train_start", module)
            for batch_idx in range(self.max_steps):
                batch = _batch(batch_idx)
                self._call("on_train_batch_start", module, batch, batch_idx)
                optimizer.zero_grad()
                loss = module.training_step(batch, batch_idx)
                if batch_idx == self.fail_at:
                    raise self.fail("the training step failed")
                loss.backward()
                optimizer.step()
                self.global_step += 1
                self._call("on_train_batch_end", module, loss, batch, batch_idx)
                run = self.callbacks[0].trace
                self.traces.append((run, run is not None and run.active))
            self._call("on_train_end", module)
            self._call("on_fit_end", module)
        except BaseException as exc:
            self._call("on_exception", module, exc)
            raise


class FakeHFTrainer:
    """Hugging Face Trainer's inner loop, reduced to its callback events, accumulation and the optimizer step."""

    def __init__(self, model: nn.Module, callbacks: list[Any], max_steps: int, accumulation: int = 2, fail_at: int | None = None) -> None:
        self.model, self.callbacks, self.max_steps, self.accumulation, self.fail_at = model, callbacks, max_steps, accumulation, fail_at
        self.args, self.control = types.SimpleNamespace(gradient_accumulation_steps=accumulation), types.SimpleNamespace()
        self.state = types.SimpleNamespace(global_step=0)
        self.traces: list[Any] = []

    def _call(self, event: str, **kwargs: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self.args, self.state, self.control, model=self.model, **kwargs)

    def train(self) -> None:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self._call("on_train_begin", optimizer=optimizer)
        for step in range(self.max_steps):
            self._call("on_step_begin")
            for micro in range(self.accumulation):
                loss = self.model.training_step(_batch(step * self.accumulation + micro), micro) / self.accumulation
                if step == self.fail_at:
                    raise _Boom("the training step failed")
                loss.backward()
                if micro < self.accumulation - 1:
                    self._call("on_substep_end")
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self._call("on_pre_optimizer_step")
            optimizer.step()
            self._call("on_optimizer_step")
            self.model.zero_grad()
            self.state.global_step += 1
            self._call("on_step_end")
            run = self.callbacks[0].trace
            self.traces.append((run, run is not None and run.active))
        self._call("on_train_end")


def _left_installed(model: nn.Module) -> list[str]:
    """Everything a trace may install, process-wide, that is still installed (empty when clean)."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    left = [f"{n}: tensor hook" for n, p in model.named_parameters() if p._backward_hooks]
    left += [f"{n}: post-accumulate hook" for n, p in model.named_parameters() if getattr(p, "_post_accumulate_grad_hooks", None)]
    left += [f"{n}: module hook" for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    if torch._C._len_torch_function_stack():
        left.append("torch-function mode")
    if _global_optimizer_pre_hooks or _global_optimizer_post_hooks:
        left.append("optimizer step hooks")
    if torch.nn.modules.module._global_forward_hooks:
        left.append("global module forward hook")
    if torch._C._autograd._top_saved_tensors_default_hooks(True) is not None:
        left.append("saved-tensor hooks")
    if not torch.is_grad_enabled():
        left.append("grad mode off")
    return left


@pytest.fixture
def entered(monkeypatch: pytest.MonkeyPatch) -> list[Trace]:
    """Every trace entered during the test."""
    traces: list[Trace] = []
    enter = Trace.__enter__

    def counting(self: Trace) -> Trace:
        traces.append(self)
        return enter(self)

    monkeypatch.setattr(Trace, "__enter__", counting)
    return traces


def _headers(console: Console) -> list[str]:
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return [line for line in text.splitlines() if line.startswith(("gradprobe · step", "gradprobe · end of run"))]


def test_lightning_callback_keeps_one_trace_for_the_run(fake_lightning: Any, entered: list[Trace]) -> None:
    """50 steps under one trace, entered at train start and exited at train end; reports every 20 steps and at the end."""
    console, lines = _console(), []
    callback = fake_lightning.GradProbeCallback(every_n_steps=20, console=console, log=lines.append)
    assert callback.trace is None
    model = _TwoHeads()
    trainer = FakeLightningTrainer([callback], max_steps=50)
    trainer.fit(model)
    assert len(entered) == 1 and entered[0] is callback.trace is callback.last
    assert {id(t) for t, _ in trainer.traces} == {id(callback.trace)} and all(active for _, active in trainer.traces)
    run = callback.trace
    assert run is not None and not run.active and run._raised is None
    assert _left_installed(model) == []
    assert callback.reports == 3
    # the trainer's global steps 20 and 40 are the trace's steps 19 and 39 (the trace counts from 0, as its report)
    assert _headers(console) == ["gradprobe · step 19", "gradprobe · step 39", "gradprobe · end of run (after step 49)"]
    assert [line for line in lines if line.startswith("gradprobe report")] == [
        "gradprobe report, step 19", "gradprobe report, step 39", "gradprobe report, end of run (after step 49)",
    ]
    text = console.file.getvalue()  # type: ignore[attr-defined]
    mid_run = text[text.index("gradprobe · step 39\n") : text.index("gradprobe · end of run")]
    assert "step 39, the latest" in mid_run and "The run · 40 steps (0–39)" in mid_run  # t.report() while active
    assert "step 49, the latest" in text[text.index("gradprobe · end of run") :]


def test_no_second_report_when_the_last_step_was_just_reported(fake_lightning: Any) -> None:
    """A run of 40 steps reporting every 20: the end adds nothing new, so no third copy of the step-40 report."""
    console = _console()
    callback = fake_lightning.GradProbeCallback(every_n_steps=20, console=console, log=[].append)
    FakeLightningTrainer([callback], max_steps=40).fit(_TwoHeads())
    assert _headers(console) == ["gradprobe · step 19", "gradprobe · step 39"] and callback.reports == 2


class _FlagAt:
    """A plugin that emits one warning finding at the backward call of the given (0-based) step."""

    at = 7

    def __init__(self) -> None:
        self.calls = 0

    @gradprobe.hookimpl
    def gradprobe_after_backward(self, trace: Trace, record: Any, error: Any) -> None:
        self.calls += 1
        if self.calls == self.at + 1:
            trace.emit(gradprobe.Finding("GP999", "demo", "warning", f"saw backward call {self.calls}"))


def test_lightning_findings_are_logged_when_their_step_ends(fake_lightning: Any) -> None:
    """A finding in step 7 (the 8th step, counted from 0) is logged at that step's end, with its number, once."""
    lines: list[str] = []
    seen_at: list[int] = []
    callback = fake_lightning.GradProbeCallback(every_n_steps=100, console=_console(), log=lines.append, plugins=(_FlagAt,))

    class Watch(_Hooks):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if any(line.startswith("gradprobe step") for line in lines) and not seen_at:
                seen_at.append(trainer.global_step)

    FakeLightningTrainer([callback, Watch()], max_steps=12).fit(_TwoHeads())
    assert seen_at == [8]
    found = [line for line in lines if "GP999" in line]
    assert found == [line for line in lines if line.startswith("gradprobe step")] and len(found) == 1
    assert found[0].startswith("gradprobe step 7: ") and "saw backward call 8" in found[0]
    assert [(step, f.code) for step, f in callback.findings] == [(7, "GP999")]


@pytest.mark.parametrize("fail", [_Boom, KeyboardInterrupt])
def test_lightning_exception_ends_the_trace(fake_lightning: Any, fail: type[BaseException]) -> None:
    """An exception (or Ctrl-C) in step 7: on_exception exits the trace, nothing stays installed, a report says why."""
    console = _console()
    callback = fake_lightning.GradProbeCallback(every_n_steps=5, console=console, log=[].append)
    model = _TwoHeads()
    with pytest.raises(fail):
        FakeLightningTrainer([callback], max_steps=50, fail_at=7, fail=fail).fit(model)
    assert _left_installed(model) == []
    assert callback.trace is not None and not callback.trace.active and callback.trace._raised == fail.__name__
    assert _headers(console) == ["gradprobe · step 4", f"gradprobe · end of run (after step 6, stopped by {fail.__name__})"]


def test_a_freed_callback_takes_its_trace_off(fake_lightning: Any) -> None:
    """A run whose callback is dropped mid-run (no train end, no exception event) leaves no hook once it is freed."""
    model = _TwoHeads()

    def start_and_drop() -> Any:
        callback = fake_lightning.GradProbeCallback(every_n_steps=5, console=_console(), log=[].append)
        trainer = FakeLightningTrainer([callback], max_steps=3)
        callback.on_train_start(trainer, model)
        trace = callback.trace
        assert trace is not None and trace.active and _left_installed(model)
        return weakref.ref(callback), weakref.ref(trace)

    callback_ref, trace_ref = start_and_drop()
    gc.collect()
    assert callback_ref() is None
    assert _left_installed(model) == []
    trace = trace_ref()
    assert trace is None or not trace.active


def test_a_second_run_ends_the_first(fake_lightning: Any, entered: list[Trace]) -> None:
    """Starting a new run with the same callback exits the previous run's trace first (one trace open at a time)."""
    callback = fake_lightning.GradProbeCallback(every_n_steps=100, console=_console(), log=[].append)
    model = _TwoHeads()
    trainer = FakeLightningTrainer([callback], max_steps=2)
    callback.on_train_start(trainer, model)
    callback.on_train_start(trainer, model)
    assert len(entered) == 2 and not entered[0].active and entered[1].active
    callback.close()
    callback.close()  # nothing open: nothing happens
    assert _left_installed(model) == [] and callback.reports == 2  # each run's end


def test_hf_callback_keeps_one_trace_for_the_run(fake_transformers: Any, entered: list[Trace]) -> None:
    """HF order of events, two micro-batches per step, clipping: one trace for 50 steps; reports every 20 and at the end."""
    console, lines = _console(), []
    callback = fake_transformers.GradProbeCallback(every_n_steps=20, console=console, log=lines.append)
    model = _TwoHeads()
    trainer = FakeHFTrainer(model, [callback], max_steps=50)
    trainer.train()
    assert len(entered) == 1 and entered[0] is callback.trace
    assert {id(t) for t, _ in trainer.traces} == {id(callback.trace)} and all(active for _, active in trainer.traces)
    assert _left_installed(model) == []
    assert _headers(console) == ["gradprobe · step 19", "gradprobe · step 39", "gradprobe · end of run (after step 49)"]


def test_hf_exception_is_ended_by_close_or_by_freeing_the_callback(fake_transformers: Any) -> None:
    """Trainer has no exception event: ``callback.close()`` in a ``finally`` ends the trace; so does freeing it."""
    model = _TwoHeads()
    console = _console()
    callback = fake_transformers.GradProbeCallback(every_n_steps=2, console=console, log=[].append)
    with pytest.raises(_Boom):
        try:
            FakeHFTrainer(model, [callback], max_steps=10, fail_at=3).train()
        finally:
            assert callback.trace is not None and callback.trace.active  # open: nothing told the callback
            callback.close()
    assert _left_installed(model) == []
    assert _headers(console)[-1] == "gradprobe · end of run (after step 2)"

    callback = fake_transformers.GradProbeCallback(every_n_steps=2, console=_console(), log=[].append)
    with pytest.raises(_Boom):
        FakeHFTrainer(model, [callback], max_steps=10, fail_at=3).train()
    assert _left_installed(model)
    del callback
    gc.collect()
    assert _left_installed(model) == []


def test_callbacks_reject_bad_options() -> None:
    """every_n_steps below 1 and a window below 1 are refused with a clear message."""
    from gradprobe.integrations.steps import RunTracer

    with pytest.raises(ValueError, match="every_n_steps"):
        RunTracer(0)
    with pytest.raises(ValueError, match="window"):
        RunTracer(5, window=0)


def test_new_findings_are_handed_out_once_also_when_the_trace_forgets_old_ones() -> None:
    """The trace may replace its finding list by a shorter one (old repeats forgotten): nothing is logged twice or lost."""
    from gradprobe.findings import Finding
    from gradprobe.integrations.steps import NewFindings

    make = lambda i: Finding(f"GP9{i:02d}", "demo", "warning", f"finding {i}")  # noqa: E731
    trace = types.SimpleNamespace(_findings=[make(0), make(1)])
    new = NewFindings()
    assert [f.message for f in new(trace)] == ["finding 0", "finding 1"]  # type: ignore[arg-type]
    assert new(trace) == []  # type: ignore[arg-type]
    trace._findings.append(make(2))
    assert [f.message for f in new(trace)] == ["finding 2"]  # type: ignore[arg-type]
    kept = [trace._findings[0], trace._findings[2]]
    trace._findings = kept + [make(3)]  # forgot finding 1, then found finding 3
    assert [f.message for f in new(trace)] == ["finding 3"]  # type: ignore[arg-type]
    trace._findings.append(make(4))
    assert [f.message for f in new(trace)] == ["finding 4"]  # type: ignore[arg-type]
    assert new(types.SimpleNamespace(_findings=list(trace._findings))) == []  # type: ignore[arg-type]


class _HandSGD:
    """An optimizer that is not a ``torch.optim.Optimizer`` (torch's optimizer-step hooks never see it)."""

    def __init__(self, params: Any, lr: float) -> None:
        self.params, self.lr = list(params), lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p -= self.lr * p.grad


def test_steps_end_with_the_framework_when_no_torch_optimizer_steps(fake_lightning: Any) -> None:
    """The trainer stepped but no torch optimizer did: the callback ends the trace's step, so steps still count."""
    callback = fake_lightning.GradProbeCallback(every_n_steps=5, console=_console(), log=[].append)
    model = _TwoHeads()
    model.configure_optimizers = lambda: _HandSGD(model.parameters(), 0.05)  # type: ignore[method-assign]
    FakeLightningTrainer([callback], max_steps=10).fit(model)
    run = callback.trace
    assert run is not None and run.current_step == 10
    assert [r.step for r in run.records][-2:] == [8, 9]


def test_window_is_passed_to_the_run_trace(fake_lightning: Any) -> None:
    """``window=4``: the run's trace keeps at most 2 × 4 steps of records, whatever the run's length."""
    callback = fake_lightning.GradProbeCallback(every_n_steps=100, console=_console(), log=[].append, window=4)
    FakeLightningTrainer([callback], max_steps=50).fit(_TwoHeads())
    run = callback.trace
    assert run is not None and run.window == 4 and run.current_step == 50
    assert 4 <= len(run.records) <= 8 and run.records[-1].step == 49
    default = fake_lightning.GradProbeCallback(every_n_steps=100, console=_console(), log=[].append)
    FakeLightningTrainer([default], max_steps=1).fit(_TwoHeads())
    assert default.trace is not None and default.trace.window == gradprobe.trace().window  # the trace's default


class _FlagEveryStep:
    """A plugin that emits the same warning at every backward call (a finding that repeats all run long)."""

    @gradprobe.hookimpl
    def gradprobe_after_backward(self, trace: Trace, record: Any, error: Any) -> None:
        trace.emit(gradprobe.Finding("GP999", "demo", "warning", "again"))


def test_a_finding_repeated_every_step_is_logged_once_per_step(fake_lightning: Any) -> None:
    """50 steps, window 2: the trace forgets old repeats, yet each step's finding is logged exactly once, with its step."""
    lines: list[str] = []
    callback = fake_lightning.GradProbeCallback(
        every_n_steps=1000, console=_console(), log=lines.append, window=2, plugins=(_FlagEveryStep,)
    )
    FakeLightningTrainer([callback], max_steps=50).fit(_TwoHeads())
    logged = [line.split(":")[0] for line in lines if "GP999" in line]
    assert logged == [f"gradprobe step {i}" for i in range(50)]
    run = callback.trace
    assert run is not None and len(run.findings) < 10  # the trace kept the first and the recent ones
    assert [step for step, _ in callback.findings][0] == 0


def test_hf_callback_without_the_optimizer_step_event(fake_transformers: Any) -> None:
    """An older Trainer that has no on_optimizer_step event: the callback steps and reports at on_step_end."""
    console = _console()
    callback = fake_transformers.GradProbeCallback(every_n_steps=3, console=console, log=[].append)
    callback.on_optimizer_step = lambda *args, **kwargs: None  # the event never comes
    model = _TwoHeads()
    FakeHFTrainer(model, [callback], max_steps=6).train()
    assert _headers(console) == ["gradprobe · step 2", "gradprobe · step 5"]
    assert callback.trace is not None and callback.trace.current_step == 6 and _left_installed(model) == []
