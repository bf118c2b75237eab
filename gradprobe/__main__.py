"""``python -m gradprobe run train.py [args]`` (see :mod:`gradprobe.integrations.cli`)."""

from __future__ import annotations

import sys

from gradprobe.integrations.cli import main

if __name__ == "__main__":
    sys.exit(main())
