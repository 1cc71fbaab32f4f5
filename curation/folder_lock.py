"""The exclusive right to write a folder, for as long as a command writes it.

A second command into the same folder stops at once with a line that names the holder (its
pid, host and start): two runs writing checkpoints, two exports swapping, two converts
removing each other's files, or two builds, would leave the folder a mix of both. The lock is
the operating system's (`flock`), so it dies with its process: a killed command never leaves a
lock that blocks the next one (the file's text only names who held it last). A build holds it
on `internal/build.lock` (`curation.store.output.OutputLock`); `finetune`, `export` and
`convert` on `FOLDER/.m3-curate.lock`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any

from curation.errors import CurationError

LOCK_FILE = ".m3-curate.lock"


class FolderLock:
    """`with FolderLock(folder, "export", "OUT"):` (`flag` names the folder in the message)."""

    def __init__(self, folder: str | os.PathLike[str], command: str, flag: str, *, lock_file: Path | None = None):
        self.folder, self.command, self.flag = Path(folder), command, flag
        self.path = lock_file or self.folder / LOCK_FILE
        self._file: IO[str] | None = None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise CurationError(f"{self.folder} is being written by {holder}; wait for it to finish, "
                                f"or give this one another {self.flag}") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"command": self.command, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _describe(text: str) -> str:
    try:
        d = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(d["since"])))
        return f"another `m3-curate {d['command']}` (pid {d['pid']} on {d['host']}, since {since})"
    except (ValueError, KeyError, TypeError):
        return "another m3-curate command"
