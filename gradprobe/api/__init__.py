"""The public objects: :class:`~gradprobe.Trace` (``trace``) and its assertion helpers.

Top of the library, under the integrations only; the facade ``gradprobe/__init__.py`` re-exports it.
"""
