"""Ctrl-C and SIGTERM in the worker processes a command starts: the scan's pool (forked, or from
a fork server beside other threads) and `demo-archive`'s spawned draw. The terminal sends
Ctrl-C's SIGINT to every process of its group, so it reaches a worker too, even one that is
still starting; what the worker must do is leave it to the command, which prints one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Sends each worker SIGINT as it starts, before the pool's initializer could ignore it.
_CTRL_C_AS_WORKERS_START = """
import os, signal, sys
import multiprocessing.forkserver as forkserver

def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)

if "--multiprocessing-fork" in sys.argv:  # a spawned worker, as its interpreter starts
    ctrl_c()

os.register_at_fork(after_in_child=ctrl_c)  # a forked worker, before it runs any code of its own

serve_one = forkserver._serve_one

def serve_after_ctrl_c(child_r, fds, unused_fds, handlers):
    # a fork server's child ignores SIGINT until it puts back the handlers it was started with
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    ctrl_c()
    return serve_one(child_r, fds, unused_fds, handlers)

forkserver._serve_one = serve_after_ctrl_c
"""

_WORKERS = """
import os, sys, threading
from pathlib import Path

from curation.demo import write_demo_archive
from curation.ingest.runners import LocalRunner

def pid(_):
    return os.getpid()

if __name__ == "__main__":
    if sys.argv[1] == "spawn":  # demo-archive's draw
        summary = write_demo_archive(Path(sys.argv[2]), cases=2, jobs=2)
        print("spawn", summary["ct"]["patients"] * 20)
        sys.exit()
    stop = threading.Event()
    if sys.argv[1] == "forkserver":  # another thread: the runner takes its workers from a fork server
        threading.Thread(target=stop.wait, daemon=True).start()
    runner = LocalRunner(2)
    pids = list(runner.map(pid, [(i,) for i in range(40)]))
    assert os.getpid() not in pids
    print(runner._pool._mp_context.get_start_method(), len(pids))
    runner.close()
"""


@pytest.mark.parametrize("start", ["fork", "forkserver", "spawn"])
def test_ctrl_c_that_reaches_a_starting_worker_is_left_to_the_command(start: str, tmp_path: Path) -> None:
    """Each worker is sent SIGINT as it starts (forked: the moment it is forked; from a fork
    server: once that child has put back its handlers; spawned: as its interpreter starts),
    before the pool's initializer could ignore it. The workers must start and work, and nothing
    be printed. Before, each printed a `KeyboardInterrupt` traceback from multiprocessing's
    start-up code and the pool broke."""
    (tmp_path / "sitecustomize.py").write_text(_CTRL_C_AS_WORKERS_START)
    (tmp_path / "workers.py").write_text(_WORKERS)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repo)])}
    done = subprocess.run([sys.executable, str(tmp_path / "workers.py"), start, str(tmp_path / "archive")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.split() == [start, "40"]
