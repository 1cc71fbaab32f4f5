"""User mistakes give one line on stderr and exit status 2, never a traceback."""

import os
from pathlib import Path

import pytest

from curation.cli import main


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["-q", *argv])
    err = capsys.readouterr().err
    return code, err


def one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def wait_for_first_dicom(proc, out: Path) -> None:
    """Until the `demo-archive` that `proc` runs has written its first DICOM file under `out`."""
    import time

    deadline = time.monotonic() + 120
    while not any(out.rglob("*.dcm")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the command ended before the signal"


def test_missing_manifest(capsys, tmp_path):
    code, err = run(capsys, "index", str(tmp_path / "nope.yaml"))
    assert code == 2 and "manifest not found" in one_line(err)


def test_typo_in_manifest(capsys, write_manifest):
    path = write_manifest({"name": "x", "sources": [{"name": "a", "kind": "nifti", "root": "a", "modalty": "CT"}]})
    code, err = run(capsys, "index", str(path))
    assert code == 2 and "sources[0].nifti.modalty: unknown key" in one_line(err)


def test_missing_root(capsys, write_manifest):
    path = write_manifest({"name": "x", "sources": [{"name": "a", "kind": "nifti", "root": "gone"}]})
    code, err = run(capsys, "index", str(path))
    assert code == 2 and "m.yaml: sources[0].root: folder not found" in one_line(err)


def test_empty_folder(capsys, write_manifest, tmp_path):
    (tmp_path / "empty").mkdir()
    path = write_manifest({"name": "x", "sources": [{"name": "a", "kind": "dicom", "root": "empty"}]})
    code, err = run(capsys, "convert", str(path), "--out", str(tmp_path / "o"))
    assert code == 2 and "source 'a': no files under" in one_line(err)


def test_unreadable_labels_table(capsys, write_manifest, tmp_path):
    root = tmp_path / "cxr"
    root.mkdir()
    (root / "labels.csv").write_bytes(b"\xff\xfe\x00binary\x00\xff")
    path = write_manifest({"name": "x", "sources": [{"name": "c", "kind": "image2d", "root": "cxr", "labels": "labels.csv"}]})
    code, err = run(capsys, "index", str(path))
    assert code == 2 and "labels.csv: cannot read the labels table" in one_line(err)


def test_index_writes_tables(capsys, write_manifest, tmp_path: Path):
    import nibabel as nib
    import numpy as np

    (tmp_path / "v").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v" / "a.nii.gz")
    path = write_manifest({"name": "x", "sources": [{"name": "v", "kind": "nifti", "root": "v"}]})
    assert main(["-q", "index", str(path), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "internal" / "index.parquet").is_file() and (tmp_path / "o" / "internal" / "ledger.parquet").is_file()
    assert "1 items from 1 files" in capsys.readouterr().out


def subcommands():
    import argparse

    from curation.cli import parser

    p = parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return p, action.choices


def test_every_command_has_a_description_and_every_option_help_and_its_default():
    _, commands = subcommands()
    assert {"demo-archive", "index", "convert", "build", "render", "preview", "export", "finetune", "eval"} <= set(commands)
    for name, sub in commands.items():
        assert sub.description and "\n" not in sub.description, name
        text = sub.format_help()
        for action in sub._actions:
            if action.help == "==SUPPRESS==" or "-h" in action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.option_strings and not action.required:
                shown = sub.formatter_class(name)._get_help_string(action)
                assert "default" in shown, f"{name} {action.option_strings}: the help does not say the default"
        assert "(default: " in text or name in ("demo-archive",)


def test_every_number_an_option_takes_has_its_range_and_the_default_is_in_it():
    """A bare `type=int` takes `--save-steps 0` and ends in a ZeroDivisionError mid-run (or
    `--cpu-threads 0` as "the default"): every number is declared with `cli.whole`/`cli.number`."""
    _, commands = subcommands()
    numbers = 0
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.type not in (int, float), f"{name} {action.option_strings}: a number without its range"
            if getattr(action.type, "__name__", "") in ("whole_number", "real_number"):
                numbers += 1
                if action.default is not None:
                    assert action.type(str(action.default)) == action.default, f"{name} {action.option_strings}: default out of range"
    assert numbers >= 25


@pytest.mark.parametrize("argv, said", [
    (["build", "m.yaml", "--limit", "-3"], "argument --limit: a whole number ≥ 1 is wanted, got '-3'"),
    (["index", "m.yaml", "--workers", "0"], "argument --workers: a whole number ≥ 1 is wanted, got '0'"),
    (["preview", "m.yaml", "--html", "p.html", "--port", "70000"], "argument --port: a whole number from 0 to 65535 is wanted, got '70000'"),
    (["finetune", "--data", "d", "--model", "tiny", "--out", "o", "--save-steps", "0"], "argument --save-steps: a whole number ≥ 1 is wanted, got '0'"),
    (["finetune", "--data", "d", "--model", "tiny", "--out", "o", "--max-steps", "0"], "argument --max-steps: a whole number ≥ 1 (or -1) is wanted, got '0'"),
    (["finetune", "--data", "d", "--model", "tiny", "--out", "o", "--lr", "-1"], "argument --lr: a number > 0 is wanted, got '-1'"),
    (["finetune", "--data", "d", "--model", "tiny", "--out", "o", "--warmup-ratio", "2"], "argument --warmup-ratio: a number ≥ 0 and < 1 is wanted, got '2'"),
    (["finetune", "--data", "d", "--model", "tiny", "--out", "o", "--epochs", "nan"], "argument --epochs: a number > 0 is wanted, got 'nan'"),
    (["eval", "--model", "m", "--data", "d", "--cpu-threads", "two"], "argument --cpu-threads: a whole number ≥ 1 is wanted, got 'two'"),
])
def test_a_number_out_of_its_range_is_refused_before_any_work(argv, said, capsys):
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {said}")


@pytest.mark.parametrize("argv", [["-q", "index"], ["index", "-q"], ["-v", "index"], ["index", "-v"]])
def test_quiet_and_verbose_go_before_or_after_the_command(argv, capsys, tmp_path):
    code = main([*argv, str(tmp_path / "nope.yaml")])
    assert code == 2 and "manifest not found" in capsys.readouterr().err
    from curation.cli import parser

    args = parser().parse_args([*argv, "m.yaml"])
    assert args.quiet == ("-q" in argv) and args.verbose == ("-v" in argv)


def test_a_write_the_file_system_refuses_is_one_line_naming_the_path(tmp_path, write_manifest):
    """pyarrow's write errors carry no file name: the line names the command's output folder.
    The limit on file size stands in for a full disk: a real OS-level failure of `write`."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np

    (tmp_path / "v").mkdir()
    for k in range(40):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v" / f"case_{k:03d}_with_a_long_name.nii.gz")
    path = write_manifest({"name": "x", "sources": [{"name": "v", "kind": "nifti", "root": "v"}]})

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "curation", "-q", "index", str(path), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, preexec_fn=small_files, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line.startswith(f"m3-curate: error: {tmp_path / 'o'}") and "File too large" in line
    drawn = subprocess.run([sys.executable, "-m", "curation", "-q", "demo-archive", str(tmp_path / "demo"), "--cases", "1"],
                           capture_output=True, text=True, preexec_fn=small_files, timeout=120, env={**os.environ, "PYTHONPATH": str(repo)})
    assert drawn.returncode == 2 and one_line(drawn.stderr).startswith(f"m3-curate: error: {tmp_path / 'demo'}"), drawn.stderr[-2000:]


def test_a_command_ends_without_module_teardown_yet_runs_its_exit_handlers(tmp_path, write_manifest):
    """`run` (the console script, `python -m curation`) skips the interpreter's module
    teardown (1.5 s after MONAI was imported) but flushes the output, runs the exit handlers
    and keeps the status."""
    import os
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np

    (tmp_path / "v").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v" / "a.nii.gz")
    path = write_manifest({"name": "x", "sources": [{"name": "v", "kind": "nifti", "root": "v"}]})
    code = ("import atexit, sys; from curation import cli; import monai; "
            "atexit.register(lambda: print('exit handler ran')); "
            f"sys.argv = ['m3-curate', 'index', {str(path)!r}, '--out', {str(tmp_path / 'o')!r}]; cli.run()")
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stderr
    assert "1 items from 1 files" in result.stdout and result.stdout.rstrip().endswith("exit handler ran")
    bad = code.replace(str(path), str(tmp_path / "missing.yaml"))
    result = subprocess.run([sys.executable, "-c", bad], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 2 and one_line(result.stderr).startswith("m3-curate: error:")


def test_sigterm_ends_a_command_as_ctrl_c_does_with_its_exit_handlers_run(tmp_path):
    """A scheduler's SIGTERM (`kill`, Kubernetes, `ray job stop`) mid-command: one line, status
    143, and the exit handlers run (Python's default ends the process with neither)."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "archive"
    code = ("import atexit, sys; from curation import cli; "
            "atexit.register(lambda: print('exit handler ran', flush=True)); "
            f"sys.argv = ['m3-curate', '-q', 'demo-archive', {str(out)!r}, '--cases', '400']; cli.run()")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    wait_for_first_dicom(proc, out)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert one_line(stderr) == "m3-curate: terminated (SIGTERM)"
    assert stdout.rstrip().endswith("exit handler ran")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_stopping_demo_archive_ends_its_worker_processes_with_it(tmp_path, how):
    """`demo-archive --jobs 2` draws in worker processes, each part long. Ctrl-C (SIGINT to the
    whole group) or a SIGTERM to the command alone ends the command with its one line and its
    workers with it: before, the workers went on with their parts and the command waited for
    them (minutes here), and each printed its own traceback on Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    out = tmp_path / "archive"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "curation", "-q", "demo-archive", str(out), "--ct", "2000", "--brain", "1",
                             "--cxr", "1", "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(repo)})
    wait_for_first_dicom(proc, out)
    workers = psutil.Process(proc.pid).children(recursive=True)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, one_line(stderr)) == ((130, "m3-curate: interrupted") if how == "ctrl-c" else
                                                   (143, "m3-curate: terminated (SIGTERM)"))
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"worker processes left running: {alive}"


@pytest.mark.slow
def test_ctrl_c_while_worker_processes_scan_is_one_line(tmp_path, write_manifest):
    """The terminal sends Ctrl-C's SIGINT to every process of its group, the scan's worker
    processes too: they leave it to the command, which prints its one line (before, each
    forked worker printed a `KeyboardInterrupt` traceback of its own)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from curation.demo import write_demo_archive

    archive = tmp_path / "archive"
    write_demo_archive(archive, cases=4, ct_cases=125, brain_cases=50, cxr_images=5000, distinct=16, jobs=2)
    path = write_manifest({"name": "x", "sources": [{"name": "ct", "kind": "dicom", "root": str(archive / "ct")},
                                                    {"name": "cxr", "kind": "image2d", "root": str(archive / "cxr")}]})
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "curation", "-q", "index", str(path), "--out", str(tmp_path / "o"), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    deadline = time.monotonic() + 60
    while proc.poll() is None and len(psutil.Process(proc.pid).children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the scan ended before its workers were seen"
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert one_line(stderr) == "m3-curate: interrupted"


def test_finetune_export_and_convert_stop_at_once_while_another_writes_their_folder(tmp_path, write_manifest, capsys):
    """Two runs writing checkpoints, two exports swapping or two converts removing each other's
    files in one folder would leave it a mix of both: the second stops naming the first, as a
    second build does (`FolderLock`; here the first is this process, holding the lock)."""
    import dicom_factory as fac
    from shards_factory import write_shards

    from curation.folder_lock import FolderLock

    def run(argv: list[str]) -> tuple[int, str]:
        code = main(["-q", *argv])
        return code, capsys.readouterr().err

    shards = write_shards(tmp_path / "build", conversations=6)
    fac.write_series(tmp_path / "in" / "s", n_slices=4)
    manifest = write_manifest({"name": "c", "sources": [{"name": "s", "kind": "dicom", "root": str(tmp_path / "in"), "select": {"min_slices": 1}}]})
    runs = {
        "finetune": (["finetune", "--data", str(shards), "--model", "tiny", "--out", str(tmp_path / "ft"), "--max-steps", "1"], "--out"),
        "export": (["export", "llava", str(shards), str(tmp_path / "llava")], "OUT"),
        "convert": (["convert", str(manifest), "--out", str(tmp_path / "nifti")], "--out"),
    }
    for command, (argv, flag) in runs.items():
        folder = tmp_path / argv[argv.index(flag) + 1 if flag != "OUT" else -1]
        with FolderLock(folder, command, flag):
            capsys.readouterr()
            code, err = run(argv)
            said = err.strip().splitlines()[-1]
            assert code == 2 and said.startswith(f"m3-curate: error: {folder} is being written by another `m3-curate {command}` "
                                                 f"(pid {os.getpid()} "), said
            assert said.endswith(f"wait for it to finish, or give this one another {flag}"), said
        assert run(argv)[0] == 0, command  # the lock goes with its holder


@pytest.mark.parametrize("command", ["export", "finetune", "eval"])
def test_an_output_inside_the_dataset_it_reads_is_refused_before_any_work(tmp_path, capsys, command):
    """The next build replaces `dataset/` whole (the export, checkpoints or metrics there would
    be lost with it), and `dataset/` is the folder shared."""
    from shards_factory import write_shards

    build = write_shards(tmp_path / "build", conversations=6)
    (build / "dataset" / "dataset_card.json").write_text("{}")
    inside = build / "dataset" / "mine"
    argv = {"export": ["export", "llava", str(build), str(inside)],
            "finetune": ["finetune", "--data", str(build / "dataset" / "data"), "--model", "tiny", "--out", str(inside)],
            "eval": ["eval", "--model", str(tmp_path / "model"), "--data", str(build), "--out", str(inside / "eval.json")]}[command]
    assert main(["-q", *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"is inside {(build / 'dataset').resolve()}, the dataset it reads: the next build replaces that folder whole, and it is the "
        "folder shared; write elsewhere")
    assert not inside.exists()
