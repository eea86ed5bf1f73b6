"""`covey.atomic_files` says which modules replace files through it and which rename
whole folders themselves; every rename in covey must be one of those."""

from __future__ import annotations

import re
from pathlib import Path

import covey
import covey.atomic_files as atomic_files

RENAME = re.compile(r"\bos\.(replace|rename)\(")


def test_every_rename_in_covey_is_one_the_atomic_files_docstring_names():
    package = Path(covey.__file__).parent
    renaming = {
        ".".join(path.relative_to(package.parent).with_suffix("").parts)
        for path in package.rglob("*.py")
        if path.name != "atomic_files.py" and RENAME.search(path.read_text())
    }
    assert renaming  # the scan sees the folder renames it must find
    unnamed = [m for m in sorted(renaming) if f"`{m}`" not in atomic_files.__doc__]
    assert unnamed == []
