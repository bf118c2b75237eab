"""The finding-code table: complete, true to the plugins, and the README generated from it."""

from __future__ import annotations

import pathlib
import re

import pytest

import gradprobe.detectors as package
from gradprobe.capture.plugin_catalog import BUILTIN_PLUGINS, _load
from gradprobe.detectors import CODES, codes_markdown
from gradprobe.integrations.cli import CODES_END, CODES_START, main, write_codes

ROOT = pathlib.Path(package.__file__).parent.parent


def test_every_emitted_code_is_in_the_table() -> None:
    """Each `code="GP..."` anywhere in the package has a row in CODES, and each row is emitted somewhere."""
    emitted = set()
    for path in ROOT.rglob("*.py"):
        if path.name != "__init__.py" or path.parent.name != "detectors":
            emitted |= set(re.findall(r'"(GP\d{3})"', path.read_text()))
    listed = {c.code for c in CODES}
    assert emitted == listed


def test_rows_match_the_plugins() -> None:
    """A row's kind is a built-in plugin's name and its default column is that plugin's `default`."""
    for c in CODES:
        if c.kind.startswith("("):
            continue
        # "kind (plugin)" when the finding's kind is not the plugin's name (GP400, GP410: decompose)
        name = c.kind.split(" (")[1].rstrip(")") if " (" in c.kind else c.kind
        assert name in BUILTIN_PLUGINS, c
        cls = _load(BUILTIN_PLUGINS[name])
        assert getattr(cls, "default", True) == c.default, c
    assert [c.code for c in CODES] == sorted(c.code for c in CODES)


def test_readme_table_is_generated() -> None:
    """The README's codes section is exactly `python -m gradprobe codes` (regenerate with --write README.md)."""
    readme = (ROOT.parent / "README.md").read_text()
    block = readme.split(CODES_START, 1)[1].split(CODES_END, 1)[0]
    assert block == "\n" + codes_markdown()


def test_codes_command_writes_between_markers(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gradprobe codes --write FILE` fills the markers once and leaves the rest of the file alone."""
    doc = tmp_path / "README.md"
    doc.write_text(f"# x\n{CODES_START}\nold\n{CODES_END}\ntail\n")
    assert main(["codes", "--write", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# x\n") and text.endswith(f"{CODES_END}\ntail\n") and "| GP801 |" in text
    assert not write_codes(str(doc))  # already up to date
    assert main(["codes"]) == 0
    assert capsys.readouterr().out.endswith(codes_markdown())
    (tmp_path / "plain.md").write_text("no markers")
    assert main(["codes", "--write", str(tmp_path / "plain.md")]) == 2
