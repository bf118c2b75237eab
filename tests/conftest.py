from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# gradprobe's own tests fail on gradprobe's own bugs: a built-in plugin that raises re-raises instead
# of becoming a GP001 notice (NOTE [internal errors] in gradprobe/capture/failures.py). Set in the
# environment, so subprocesses (examples, DDP workers, pytester runs) inherit it.
os.environ["GRADPROBE_STRICT_INTERNAL"] = "1"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Run a test on the CPU, and on CUDA when there is a GPU."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
