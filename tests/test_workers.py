"""No orphans: DataLoader workers of a job killed with SIGKILL are gone within seconds."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.workers import WorkerInit, data_loader

ROOT = Path(__file__).resolve().parent.parent


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def large_images(tmp_path_factory) -> Path:
    """200 noisy 256 px pictures: a batch of them fills the pipe between a worker and its parent, which is how
    workers hang on after the parent is gone (their queue's feeder thread waits for a reader forever)."""
    folder = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    for i in range(200):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}.jpg", quality=60)
    return folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses PR_SET_PDEATHSIG")
def test_no_worker_outlives_a_killed_inference(trained_run, large_images, tmp_path):
    job = subprocess.Popen(
        [sys.executable, str(ROOT / "git_qlora_main.py"), "--inference", "--output_dir", str(trained_run), "--test_dir",
         str(large_images), "--predictions_file", str(tmp_path / "captions.csv"), "--num_workers", "2",
         "--batch_size", "8"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while len(children(job.pid)) < 2 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.1)
    workers = children(job.pid)
    assert len(workers) >= 2, "the job never started its DataLoader workers"
    time.sleep(1.0)  # let the workers fill their queues
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=10)
    time.sleep(10)
    survivors = [pid for pid in workers if alive(pid)]
    for pid in survivors:  # never leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"{len(survivors)} DataLoader worker(s) still alive 10 s after the job was killed"


def seeded(worker_id: int) -> None:
    Path(os.environ["WORKER_MARK"]).joinpath(str(worker_id)).write_text(str(os.getppid()))


def test_data_loader_keeps_the_loaders_own_init(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKER_MARK", str(tmp_path))
    loader = data_loader(list(range(8)), batch_size=2, num_workers=2, worker_init_fn=seeded)
    assert isinstance(loader.worker_init_fn, WorkerInit)
    assert sorted(x for batch in loader for x in batch.tolist()) == list(range(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1"]
    assert {p.read_text() for p in tmp_path.iterdir()} == {str(os.getpid())}


def test_the_trainers_loaders_are_guarded(trained_run, train_cmd, tmp_path, monkeypatch):
    """The Trainer builds its own DataLoaders (and Accelerate wraps them): both get the parent-death init."""
    from scripts.caption_trainer import CaptionTrainer, Trainer

    seen = {}
    real = Trainer.train

    def capture(self, *args, **kwargs):
        seen["train"] = self.get_train_dataloader()
        seen["eval"] = self.get_eval_dataloader()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CaptionTrainer, "train", capture)
    from git_qlora_main import main

    assert main(train_cmd(tmp_path, "w", "--max_steps", "1", "--num_workers", "1", "--cache_image_features", "off")) == 0
    for kind in ("train", "eval"):
        inner = getattr(seen[kind], "base_dataloader", seen[kind])
        assert isinstance(inner.worker_init_fn, WorkerInit), kind
    assert seen["train"].base_dataloader.worker_init_fn.inner is not None  # the Trainer's seed_worker still runs
