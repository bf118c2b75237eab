"""A module that looks installed: written to ``<tmp>/site-packages/<package>/core.py`` and loaded from there."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from types import ModuleType


def load_fake_library(tmp_path: Path, package: str, source: str) -> ModuleType:
    """Load ``source`` from a path under ``site-packages/<package>/`` (an installed library's path).

    It is loaded under a private module name, so an installed ``package`` (the real lightning or
    accelerate) is left alone; its frames still read as the library's (``capture.sites.library_of``).
    """
    path = tmp_path / "site-packages" / package / "core.py"
    path.parent.mkdir(parents=True)
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(f"_gradprobe_fake_{package}_core", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
