"""Ledger reasons say what is wrong with a file, never where it is.

The ledger row already holds the file's `uri`; a reason is counted and copied into the dataset
card, which is shared. Folder names carry patient names and record numbers
(`DOE^JOHN_MRN12345/series1/IM0006.dcm`), and libraries put paths into their messages
(`[Errno 2] No such file or directory: '/archive/DOE^JOHN/…'`, nibabel's "Cannot work out file
type of …"), so every exception becomes a reason through `describe`, which keeps the message
and drops the paths.
"""

from __future__ import annotations

import os
import re

# A quoted string holding a slash, or an unquoted absolute path: what libraries print for paths.
_QUOTED_PATH = re.compile(r"""(['"])[^'"\n]*[/\\][^'"\n]*\1""")
_BARE_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[/\\][^\s'\",;:()]*")


def describe(error: BaseException, *paths: object) -> str:
    """One line: the exception's type and message, with `paths` (and their file names) and any
    other path-looking text replaced by "<file>".

    >>> describe(FileNotFoundError(2, "No such file or directory", "/data/DOE^JOHN/IM1.dcm"))
    'FileNotFoundError: No such file or directory'
    >>> describe(ValueError("Cannot work out file type of '/a/DOE^JOHN/x.nii'"))
    'ValueError: Cannot work out file type of <file>'
    """
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = " ".join(str(error).split())
    return f"{type(error).__name__}: {scrub(text, *paths)}" if text else type(error).__name__


def scrub(text: str, *paths: object) -> str:
    """`text` without the given paths, their file names, or anything that looks like a path.

    >>> scrub("bad header in IM0006.dcm", "DOE^JOHN/series1/IM0006.dcm")
    'bad header in <file>'
    """
    for path in paths:
        for form in sorted({str(path), os.path.basename(str(path))} - {""}, key=len, reverse=True):
            text = text.replace(form, "<file>")
    text = _QUOTED_PATH.sub("<file>", text)
    return _BARE_PATH.sub("<file>", text)
