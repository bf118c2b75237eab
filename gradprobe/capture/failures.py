"""gradprobe's own errors: the GP001 notice, and the switch that makes gradprobe's tests fail on them.

# NOTE [internal errors]
# A built-in plugin (a name of BUILTIN_PLUGINS) that raises is a bug in gradprobe, not in the
# user's setup: it is switched off like any plugin, but the user gets one GP001 notice per plugin
# saying so and asking for a report, instead of GP000's "fix the plugin". gradprobe's own test suite
# sets GRADPROBE_STRICT_INTERNAL=1 (tests/conftest.py), under which such an error is re-raised, so
# a detector bug fails a test instead of hiding behind a notice. Users never set it.
"""

from __future__ import annotations

import os
import traceback

from gradprobe.findings import Finding

__all__ = ["STRICT_ENV", "internal_error_finding", "strict_internal"]

# Set to "1" to re-raise gradprobe's internal errors instead of reporting them.
STRICT_ENV = "GRADPROBE_STRICT_INTERNAL"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_internal() -> bool:
    """Whether internal errors re-raise (``GRADPROBE_STRICT_INTERNAL=1``, set by gradprobe's own tests)."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def internal_error_finding(name: str, hook_name: str, exc: BaseException, detector: bool) -> Finding:
    """The GP001 notice for an exception raised by gradprobe's own ``name`` in ``hook_name``.

    It names the exception and the deepest gradprobe line it came from, asks for a report, and says
    what still holds: the other detectors run, the user's program and gradients are unchanged.
    """
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    # the deepest gradprobe line past the plugin host's call (a torch frame says less), else the deepest
    ours = [f for f in frames[1:] if os.path.abspath(f.filename).startswith(_PACKAGE_DIR)] or frames
    where = f" at {ours[-1].filename}:{ours[-1].lineno}" if ours else ""
    part = "detector" if detector else "component"
    return Finding(
        code="GP001",
        kind="internal_error",
        severity="warning",
        message=(
            f"internal error in gradprobe's {name} {part} ({type(exc).__name__}: {exc}{where}, in "
            f"{hook_name}); please report it at the gradprobe issue tracker. It is switched off for "
            "the rest of this trace; the other detectors keep running, and your program and "
            "gradients are unchanged"
        ),
        fix=f"nothing to change in your code; trace(..., disable=[{name!r}]) leaves it out until a fix is out",
        plugin=name,
        data={"hook": hook_name, "exception": type(exc).__name__},
    )
