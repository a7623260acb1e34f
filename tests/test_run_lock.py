"""One job per run folder, writable outputs checked first, and no DataLoader worker outliving its job."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from git_qlora_main import main
from utils import run_lock
from utils.errors import UserInputError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def many_images(data_dir, tmp_path_factory) -> Path:
    """240 copies of the test pictures: captioning them takes long enough to be caught running."""
    folder = tmp_path_factory.mktemp("many")
    pictures = sorted((data_dir / "test").glob("*.png"))
    for i in range(240):
        shutil.copy(pictures[i % len(pictures)], folder / f"img_{i:04d}.png")
    return folder


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "git_qlora_main.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def warm_cli(*args: str) -> subprocess.Popen:
    """The real command line in a process whose imports are already done: it runs main(args) when told to (a
    line on stdin), so it reaches the lock within a second instead of after half a minute of imports."""
    code = ("import sys, git_qlora_main, scripts.inference, utils.io; sys.stdin.readline(); "
            "sys.exit(git_qlora_main.main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, text=True, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return process


def wait_for_holder(folder: Path, pid: int, timeout: float = 60) -> None:
    lock = folder / ".lock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(lock.read_text())["pid"] == pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never took {lock}")


def test_second_inference_on_a_run_is_refused_and_the_first_completes(trained_run, many_images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    caption = ("--inference", "--output_dir", str(run), "--test_dir", str(many_images), "--batch_size", "1",
               "--num_workers", "0")
    second = warm_cli(*caption)
    first = cli(*caption)
    wait_for_holder(run, first.pid)
    start = time.monotonic()
    out, err = second.communicate("go\n", timeout=120)
    assert first.poll() is None, "the first job ended before the second was refused: the test proves nothing"
    assert second.returncode == 2, err[-2000:]
    assert f"The run folder {run} is in use by another job: PID {first.pid} on host {socket.gethostname()}" in err
    assert "git_qlora_main.py --inference" in err and "Traceback" not in err
    assert "Captioning with" not in err  # refused before any model loaded
    assert time.monotonic() - start < 60
    first.communicate(timeout=300)
    assert first.returncode == 0
    rows = (run / "captions.csv").read_text().splitlines()
    assert rows[0] == "image_name,caption" and len(rows) == 241
    assert not (run / ".captions.csv.parts").exists()


def test_a_lock_held_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from utils.run_lock import lock_folder; "
         f"lock_folder({str(tmp_path)!r}, 'The run folder'); print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserInputError, match=f"is in use by another job: PID {holder.pid} on host"):
        run_lock.lock_folder(tmp_path, "The run folder")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid  # the file stays, the lock does not
    try:
        run_lock.lock_folder(tmp_path, "The run folder")
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    finally:
        run_lock.release_all()


def test_train_resume_and_merge_on_a_locked_run_are_refused(trained_run, train_cmd, tmp_path, capsys):
    run = tmp_path / "r1"
    shutil.copytree(trained_run, run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from utils.run_lock import lock_folder; "
         f"lock_folder({str(run)!r}, 'x'); print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for argv in (train_cmd(tmp_path, "r1", "--resume", "--max_steps", "14"),
                     ["--merge_weights", "--output_dir", str(run)],
                     ["--eval", "--output_dir", str(run), "--test_dir", str(run), "--fgd_model", "none"]):
            assert main(argv) == 2
            assert f"PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------
# Writable outputs, checked before anything loads
# ---------------------------------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    import models.git_qlora
    import scripts.inference

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module, name in ((models.git_qlora, "load_base_model"), (scripts.inference, "load_caption_model")):
        monkeypatch.setattr(module, name, refuse)


def test_outputs_under_a_file_are_refused_before_any_model_loads(tmp_path, data_dir, trained_run, tiny_model_dir,
                                                                  capsys, no_model_loads):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = {
        "--output_dir": ["--train", "--train_dir", str(data_dir / "train"), "--model_name", str(tiny_model_dir),
                         "--output_dir", str(blocker / "runs")],
        "--predictions_file": ["--inference", "--output_dir", str(trained_run), "--test_dir", str(data_dir / "test"),
                               "--predictions_file", str(blocker / "captions.csv")],
        "--output_dir ": ["--eval", "--output_dir", str(blocker / "eval"), "--test_dir", str(data_dir / "test"),
                          "--captions_file", str(data_dir / "captions.csv"), "--model_name", str(tiny_model_dir)],
    }
    for flag, argv in cases.items():
        start = time.monotonic()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag.strip()} {blocker}/" in err and f"{blocker} is a file, so nothing can be created under it" in err
        assert "Traceback" not in err and time.monotonic() - start < 5
    assert blocker.read_text() == "not a folder"


def test_unwritable_and_wrong_kind_outputs(tmp_path, capsys):
    from utils.io import unwritable_reason

    assert unwritable_reason(tmp_path / "new" / "deeper") is None
    assert not (tmp_path / "new").exists() and not list(tmp_path.iterdir())  # the probe leaves nothing
    assert "nothing can be written in /proc" in unwritable_reason(Path("/proc/git_qlora_out"))
    (tmp_path / "f.csv").write_text("x")
    assert unwritable_reason(tmp_path / "f.csv", "folder") == f"{tmp_path / 'f.csv'} is a file, not a folder"
    assert unwritable_reason(tmp_path, "file") == f"{tmp_path} is a folder, not a file"
    assert main(["--merge_weights", "--output_dir", "/proc/git_qlora_out"]) == 2
    assert "--output_dir /proc/git_qlora_out: cannot write there: nothing can be written in /proc" in capsys.readouterr().err
