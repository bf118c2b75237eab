"""Findings: what a detector says about the user's code."""

from __future__ import annotations

import linecache
import os
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = ["Finding", "RelatedSite", "Severity", "Site"]

Severity = Literal["error", "warning", "info"]
_SEVERITIES = ("error", "warning", "info")


class Site(NamedTuple):
    """A place in the user's source: ``(filename, lineno)``.

    ``library`` names the training library (``"accelerate"``, ``"lightning"`` ...) a backward call was
    made inside when its site was moved out of it to the user's line (NOTE [library call sites] in
    capture/sites.py): ``train.py:40 (inside accelerate)``. It describes the place and is no part of
    it: sites compare and hash by ``(filename, lineno)`` alone.
    """

    filename: str
    lineno: int
    library: str | None = None

    def __str__(self) -> str:
        where = f"{os.path.basename(self.filename)}:{self.lineno}"
        return f"{where} (inside {self.library})" if self.library else where

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Site):
            return self.filename == other.filename and self.lineno == other.lineno
        if isinstance(other, tuple):  # a plain ``(filename, lineno)``
            return (self.filename, self.lineno) == other
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash((self.filename, self.lineno))

    def _key(self, other: object) -> tuple[tuple[str, int], tuple[Any, ...]] | None:
        if isinstance(other, Site):
            return (self.filename, self.lineno), (other.filename, other.lineno)
        if isinstance(other, tuple):
            return (self.filename, self.lineno), other
        return None

    def __lt__(self, other: object) -> bool:
        keys = self._key(other)
        return NotImplemented if keys is None else keys[0] < keys[1]

    def __le__(self, other: object) -> bool:
        keys = self._key(other)
        return NotImplemented if keys is None else keys[0] <= keys[1]

    def __gt__(self, other: object) -> bool:
        keys = self._key(other)
        return NotImplemented if keys is None else keys[0] > keys[1]

    def __ge__(self, other: object) -> bool:
        keys = self._key(other)
        return NotImplemented if keys is None else keys[0] >= keys[1]

    def to_list(self) -> list[Any]:
        """``[filename, lineno]``, the JSON form (``library`` goes under a key of its own)."""
        return [self.filename, self.lineno]

    @property
    def source(self) -> str:
        """The stripped source line, or ``""`` when it cannot be read."""
        return linecache.getline(self.filename, self.lineno).strip()


@dataclass(frozen=True)
class RelatedSite:
    """Another line that matters to a finding, with its role (e.g. ``"created the shared tensor"``)."""

    filename: str
    lineno: int
    role: str

    @property
    def site(self) -> Site:
        return Site(self.filename, self.lineno)


@dataclass(frozen=True)
class Finding:
    """One mistake (or notable fact) found in a trace.

    Attributes:
        code: stable identifier, e.g. ``"GP101"``.
        kind: the detector's kind, e.g. ``"freed_graph"``.
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        message: one sentence saying what happened.
        site: the user's line where it happened (never a torch or gradprobe frame), if known.
        related: other lines that matter, each with its role.
        fix: the concrete change, in the user's terms.
        plugin: the name of the plugin that produced it.
        data: extra JSON-safe details for tools.
        step: the training step it was found in (set by the trace when it is emitted, if not given).
    """

    code: str
    kind: str
    severity: Severity
    message: str
    site: Site | None = None
    related: tuple[RelatedSite, ...] = ()
    fix: str = ""
    plugin: str = ""
    data: dict[str, Any] = field(default_factory=dict, compare=False)
    step: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.severity not in _SEVERITIES:
            raise ValueError(
                f"Finding {self.code}: severity must be one of {_SEVERITIES}, got {self.severity!r}"
            )

    def format(self) -> str:
        """Plain-text form: ``file:line: CODE message (fix: ...)``."""
        where = f"{self.site}: " if self.site else ""
        text = f"{where}{self.code} [{self.severity}] {self.message}"  # no step: warnings dedupe on the text
        if self.fix:
            text += f" Fix: {self.fix}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "site": self.site.to_list() if self.site else None,
            "site_library": self.site.library if self.site else None,
            "related": [[r.filename, r.lineno, r.role] for r in self.related],
            "fix": self.fix,
            "plugin": self.plugin,
            "data": self.data,
            "step": self.step,
        }
