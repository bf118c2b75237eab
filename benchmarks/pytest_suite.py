"""What does `pytest --gradprobe` cost a suite shaped like real ones? (issue 16: CPU ≤ 1.3×, peak RSS ≤ 1.1×)

    python benchmarks/pytest_suite.py [--tests 300] [--steps 40] [--repeats 2]

Writes a suite into a temporary folder: ``--tests`` tests (parametrized over several tiny models: an
MLP, a small CNN, an RNN cell), each training its model for ``--steps`` steps (a backward call and
an optimizer step each), as suites such as BackPACK's or pytorch-optimizer's do. Runs it with and
without ``--gradprobe``, each in a fresh subprocess, interleaved, and reads the child's CPU time and
peak RSS (``ru_maxrss``) with ``resource.getrusage(RUSAGE_CHILDREN)`` inside a small wrapper process
per run (so one run's peak does not hide another's). Prints medians and the ratios to the targets.
The pytest plugin loaded is the one on ``sys.path`` first (run from the repository root).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SUITE = '''
import pytest
import torch
from torch import nn

torch.set_num_threads(1)


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)), torch.randn(4, 8)


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1)), torch.randn(2, 1, 8, 8)


class Rnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.RNNCell(4, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.out(h)


def rnn():
    return Rnn(), torch.randn(2, 5, 4)


@pytest.mark.parametrize("make", [mlp, cnn, rnn])
@pytest.mark.parametrize("seed", range({per_model}))
def test_trains(make, seed):
    torch.manual_seed(seed)
    model, x = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = None
    for _ in range({steps}):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() <= first + 1e-3
'''

WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(rc, r.ru_utime + r.ru_stime, r.ru_maxrss)\n"
)


def run(folder: Path, extra: list[str]) -> tuple[float, float]:
    """(CPU seconds, peak RSS in MiB) of one pytest run of the suite in a fresh process."""
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(folder), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=folder, check=True).stdout.split()
    rc, cpu, rss = int(out[0]), float(out[1]), int(out[2]) / 1024
    if rc != 0:
        raise SystemExit(f"the generated suite failed (exit {rc}) with {extra}: rerun it by hand in {folder}")
    return cpu, rss


def measure(tests: int = 300, steps: int = 40, repeats: int = 2, echo: bool = False) -> dict[str, float]:
    """CPU seconds and peak RSS of the generated suite with and without ``--gradprobe``, and their ratios."""
    per_model = max(1, tests // 3)
    root = Path(__file__).resolve().parent.parent
    env_path = os.environ.get("PYTHONPATH")
    strict = os.environ.pop("GRADPROBE_STRICT_INTERNAL", None)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), env_path or ""]).rstrip(os.pathsep)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "test_generated.py").write_text(textwrap.dedent(SUITE).format(per_model=per_model, steps=steps))
            if echo:
                print(f"suite: {3 * per_model} tests, {steps} backward calls each ({3 * per_model * steps} in all)")
            results: dict[str, list[tuple[float, float]]] = {"plain": [], "--gradprobe": []}
            for _ in range(repeats):
                for name in results:  # interleaved: plain, traced, plain, traced, ...
                    results[name].append(run(folder, [] if name == "plain" else [name]))
    finally:
        if env_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_path
        if strict is not None:
            os.environ["GRADPROBE_STRICT_INTERNAL"] = strict
    cpu = {k: statistics.median(c for c, _ in v) for k, v in results.items()}
    rss = {k: statistics.median(r for _, r in v) for k, v in results.items()}
    if echo:
        for name in results:
            print(f"{name:12} CPU {cpu[name]:7.2f} s   peak RSS {rss[name]:7.1f} MiB   (median of {repeats})")
    out = {
        "tests": float(3 * per_model), "backward_calls": float(3 * per_model * steps),
        "cpu_plain_s": cpu["plain"], "cpu_traced_s": cpu["--gradprobe"],
        "rss_plain_mib": rss["plain"], "rss_traced_mib": rss["--gradprobe"],
        "cpu_ratio": cpu["--gradprobe"] / cpu["plain"], "rss_ratio": rss["--gradprobe"] / rss["plain"],
    }
    if echo:
        print(f"CPU time ratio  {out['cpu_ratio']:.2f}x  (target <= 1.3x: {'met' if out['cpu_ratio'] <= 1.3 else 'MISSED'})")
        print(f"peak RSS ratio  {out['rss_ratio']:.2f}x  (target <= 1.1x: {'met' if out['rss_ratio'] <= 1.1 else 'MISSED'})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    measure(args.tests, args.steps, args.repeats, echo=True)


if __name__ == "__main__":
    main()
