"""Differential fuzz: random autograd programs run untraced and traced, PyTorch as the oracle.

The generator and the runner are in ``tests/fuzz_programs.py`` (see its docstring for what is
compared). A failure prints the mismatch categories with their counts, and for each category the
smallest failing program as runnable source (delta-debugged to fewer statements in the slow tests).
Reproduce a campaign outside pytest with ``python tests/fuzz_programs.py --n 2000``.
"""

from __future__ import annotations

import pytest
import torch

import fuzz_programs as fp

NORMAL_PROGRAMS = 250  # ~0.1-0.2 s each on the 2-core dev machine
NORMAL_ALL_PROGRAMS = 60
SLOW_PROGRAMS = 2000


def _check(seeds: range, variants: tuple[fp.Variant, ...], budget: int) -> None:
    """Run a campaign; on a mismatch, fail with the counts and the smallest program per category
    (delta-debugged when ``budget`` > 0: up to that many re-runs per category)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise comparisons: the same kernels in every run
    try:
        res = fp.campaign(seeds, variants)
        assert not res.failed, "\n" + fp.format_result(res, minimized=budget > 0, budget=budget)
    finally:
        torch.set_num_threads(threads)


def test_generator_is_deterministic() -> None:
    for seed in (0, 7, 123):
        assert fp.generate(seed) == fp.generate(seed)
        source = fp.generate(seed).repro()
        compile(source, "<repro>", "exec")  # printable, runnable source


def test_programs_exercise_pytorch_errors() -> None:
    """The oracle side is meaningful: some programs run cleanly, and each predicted kind of PyTorch
    error turns up (so a mismatch-free run is not a run of trivial programs)."""
    res = fp.Result()
    for seed in range(60):
        program = fp.generate(seed)
        base = fp.run(program, fp.UNTRACED)
        assert base.setup_exc is None
        assert 20 <= len(program.body) <= 40
        first = next((o for o in base.outcomes if o is not None), None)
        res.pytorch_errors["clean" if first is None else first.kind()] += 1
    assert res.pytorch_errors["clean"] >= 10, res.pytorch_errors
    for kind in ("freed-graph", "inplace"):
        assert res.pytorch_errors[kind] >= 3, res.pytorch_errors


def test_differential_default_detectors() -> None:
    """raise / record, every-leaf / leaf targets, default detectors: gradprobe never changes what PyTorch
    does, raises GradProbeError exactly where PyTorch would raise an error it predicts, and leaves nothing
    installed."""
    _check(range(NORMAL_PROGRAMS), fp.DEFAULT_VARIANTS, budget=0)


def test_differential_all_detectors() -> None:
    """The same with ``detect="all"`` (every-leaf mode only, fewer programs: the saved-tensor hooks cost more)."""
    _check(range(10_000, 10_000 + NORMAL_ALL_PROGRAMS), fp.ALL_VARIANTS, budget=0)


@pytest.mark.slow
def test_differential_default_detectors_many() -> None:
    _check(range(SLOW_PROGRAMS), fp.DEFAULT_VARIANTS, budget=400)


@pytest.mark.slow
def test_differential_all_detectors_many() -> None:
    _check(range(10_000, 10_000 + SLOW_PROGRAMS // 2), fp.ALL_VARIANTS, budget=400)
