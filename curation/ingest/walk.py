"""Every entry under a source root, once, in sorted order, whatever the archive's links do.

A hostile or merely untidy archive holds links in loops (`loop -> .`), a second path to a folder,
links to files elsewhere, named pipes (which block whoever opens them), folders that cannot be
read and names that are not UTF-8. `walk` turns each of these into an `Entry` with the reason it
is not read, so the ledger accounts for it, and it lists each real file and folder once:

- folders are walked once, known by (device, inode): a loop or a second path to a folder ends
  at the folder already walked;
- `follow_links: true` (the default) follows links wherever they point, except that a link to
  something inside the root is not followed (the target is listed under its own path), and a
  file outside the root reached through two links is listed once;
- `follow_links: false` follows none: each link is listed as not followed.

Order: names sorted with a folder's contents where its path sorts (a folder `a` sorts as
`a/`), so the output is the sorted list of relative paths, produced as a stream: the walk holds
one folder listing per level, never the whole archive.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from curation.errors import CurationError
from curation.items import uri_text

PLAIN = "\0plain"  # a listing's mark for a regular file (never a reason: reasons never hold NUL)
SPECIAL_KINDS = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                 (stat.S_ISBLK, "block device"))


@dataclass(frozen=True, slots=True)
class Entry:
    """One path under the root (`uri`: relative, in the text form of `curation.items.uri_text`).
    `skip` set: the entry is not read, and this is its ledger reason."""

    uri: str
    skip: str | None = None


def walk(root: Path, follow_links: bool = True) -> Iterator[Entry]:
    """The entries under `root` (see the module docstring)."""
    walker = _Walk(Path(root), follow_links)
    yield from walker.run()


class _Walk:
    def __init__(self, root: Path, follow_links: bool):
        self.root = root
        self.follow = follow_links
        self.real_root = os.path.realpath(root)
        self.seen_dirs: set[tuple[int, int]] = set()
        self.seen_outside_files: set[tuple[int, int]] = set()

    def run(self) -> Iterator[Entry]:
        try:
            self.seen_dirs.add(_identity(os.stat(self.root)))
            first = self._listing(str(self.root), "", strict=True)
        except OSError as e:
            raise CurationError(f"cannot list the source root {self.root}: {e.strerror or e}") from e
        stack: list[tuple[Iterator[tuple[str, str, str | None]], bool]] = [(first, False)]
        while stack:
            listing, outside = stack[-1]
            step = next(listing, None)
            if step is None:
                stack.pop()
                continue
            path, rel, note = step
            if note is not None and note is not PLAIN:
                entry, descend = Entry(uri_text(rel), f"folder cannot be read ({note})"), False
            else:
                entry, descend = self._visit(path, rel, outside, note is PLAIN)
            if entry is not None:
                yield entry
            if descend:
                stack.append((self._listing(path, rel + "/"), outside or os.path.islink(path)))

    def _listing(self, path: str, prefix: str, strict: bool = False) -> Iterator[tuple[str, str, str | None]]:
        """(path, relative path, None) of each entry of folder `path`, sorted; a folder that
        cannot be listed gives one (path, its own relative path, why) instead (the root raises).
        Plain files are marked from the listing itself (no stat call per file)."""
        try:
            with os.scandir(path) as it:
                names = sorted((e.name + "/" if _is_dir(e) else e.name, e.name, _plain_file(e)) for e in it)
        except OSError as e:
            if strict:
                raise
            return iter([(path, prefix.rstrip("/"), e.strerror or type(e).__name__)])
        return ((os.path.join(path, name), prefix + name, PLAIN if plain else None) for _, name, plain in names)

    def _visit(self, path: str, rel: str, outside: bool, plain: bool = False) -> tuple[Entry | None, bool]:
        """(the entry to list, or None for a folder to walk; whether to descend into `path`).
        `outside`: the walk is in a folder outside the root, reached through a link; `plain`:
        the listing says this is a regular file (no link), so no stat call is needed."""
        text = uri_text(rel)
        if text != rel and os.path.lexists(self.root / text):
            return Entry(_distinct_text(self.root, rel), "file name is not valid UTF-8 and its escaped form names another file"), False
        if plain and not outside:
            return Entry(text), False
        try:
            own = os.lstat(path)
        except OSError as e:
            return Entry(text, f"cannot be read ({e.strerror or type(e).__name__})"), False
        if stat.S_ISLNK(own.st_mode):
            return self._link(path, text)
        if stat.S_ISDIR(own.st_mode):
            return self._folder(own, text)
        if stat.S_ISREG(own.st_mode):
            return self._outside_file(own, text) if outside else Entry(text), False
        return Entry(text, f"not a regular file ({_special(own.st_mode)})"), False

    def _folder(self, st: os.stat_result, text: str) -> tuple[Entry | None, bool]:
        ident = _identity(st)
        if ident in self.seen_dirs:
            return Entry(text, "folder already walked under another path (a loop or a bind mount)"), False
        self.seen_dirs.add(ident)
        return None, True

    def _outside_file(self, st: os.stat_result, text: str) -> Entry:
        """A file outside the root (through a link): listed once, whichever path meets it first."""
        if _identity(st) in self.seen_outside_files:
            return Entry(text, "file outside the root already listed through another link")
        self.seen_outside_files.add(_identity(st))
        return Entry(text)

    def _link(self, path: str, text: str) -> tuple[Entry | None, bool]:
        if not self.follow:
            return Entry(text, "symbolic link not followed (follow_links: false)"), False
        try:
            target = os.stat(path)
        except OSError as e:
            return Entry(text, f"broken symbolic link ({e.strerror or type(e).__name__})"), False
        real = os.path.realpath(path)
        inside = real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)
        if stat.S_ISDIR(target.st_mode):
            if inside or _identity(target) in self.seen_dirs:
                return Entry(text, "link to a folder walked under its own path (inside the root, a loop or a second link)"), False
            return self._folder(target, text)
        if stat.S_ISREG(target.st_mode):
            if inside:
                return Entry(text, "link to a file inside the root, listed under its own path"), False
            return self._outside_file(target, text), False
        return Entry(text, f"link to something that is not a regular file ({_special(target.st_mode)})"), False


def _distinct_text(root: Path, rel: str) -> str:
    """A text for a name whose escaped form is taken: its bytes with backslash escapes, or, in
    the absurd case that this too names a file, that text and a NUL (which no file name holds)."""
    text = os.fsencode(rel).decode("utf-8", "backslashreplace")
    return text if not os.path.lexists(root / text) else text + "\0"


def _plain_file(entry: os.DirEntry[str]) -> bool:
    """A regular file and not a link, known from the folder listing alone (`d_type`)."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """Whether an entry sorts as a folder: a real folder, or a link to one (it is walked, or
    listed, where a folder of its name would be)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _special(mode: int) -> str:
    return next((name for test, name in SPECIAL_KINDS if test(mode)), "unknown file type")
