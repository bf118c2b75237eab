"""pytest plugin for gradprobe (loaded through the ``pytest11`` entry point).

Kept import-light: pytest loads it on every run, so torch is imported only when a test uses it.
"""

from __future__ import annotations
