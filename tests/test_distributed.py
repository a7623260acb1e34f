"""Several processes: real `torchrun --nproc_per_node 2` launches (gloo on the CPU) of --train, --inference and --eval,
resumable captioning, and the pure helpers of utils/distributed.py and utils/io.py.

Every launch runs under a timeout that fails the test, so a rank waiting forever for another is a failure.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoProcessor

from git_qlora_main import main
from utils.distributed import split_for_rank
from utils.io import CaptionPartWriter, caption_parts_dir, read_caption_parts

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 180  # seconds; a tiny-model launch takes 10-25 s on 2 busy cores


def _env() -> dict:
    # CPU ranks (gloo) even on a GPU machine: CI has 2 cores and no GPU, and one GPU cannot host two ranks.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GOMP_SPINCOUNT="1000", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    return env


def _command(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "git_qlora_main.py", *args]
    # --standalone: a free local port, so parallel test runs on one machine never meet.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "git_qlora_main.py", *args]


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once (torchrun starts each rank in its own session, so a
    process-group kill would leave the ranks running)."""
    import psutil

    try:
        tree = psutil.Process(process.pid)
        victims = tree.children(recursive=True) + [tree]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(victims, timeout=10)


def launch(args: list[str], nproc: int = 2, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """Run the CLI under torchrun; a launch still running after `timeout` is killed (every rank) and fails the test."""
    process = subprocess.Popen(_command(args, nproc), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(process)
        pytest.fail(f"{nproc}-process launch still running after {timeout} s (a rank hangs): {args}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, "")


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 5, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_for_rank_gives_every_item_to_exactly_one_rank(count, world):
    items = [f"img_{i}" for i in range(count)]
    shares = [split_for_rank(items, r, world) for r in range(world)]
    assert [x for share in shares for x in share] == items  # in order, none twice, none missing, no padding
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_part_files_survive_a_half_written_line(tmp_path):
    parts = caption_parts_dir(tmp_path / "captions.csv")
    assert parts == tmp_path / ".captions.csv.parts"
    with CaptionPartWriter(parts, 0) as part:
        part.append({"a.png": "a red, round circle", 'b "q".png': "two\tthings"}, {"bad.png": "not an image"})
    with CaptionPartWriter(parts, 3) as part:
        part.append({"c.png": "a square"}, {})
    with open(parts / "rank-00003.csv", "a", encoding="utf-8") as handle:
        handle.write("d.png,a half-writ")  # killed mid-write
    captions, skipped = read_caption_parts(parts)
    assert captions == {"a.png": "a red, round circle", 'b "q".png': "two\tthings", "c.png": "a square"}
    assert skipped == {"bad.png": "not an image"}
    with CaptionPartWriter(parts, 3) as part:  # a resumed rank cuts the half line before appending
        part.append({"d.png": "a triangle"}, {})
    assert read_caption_parts(parts)[0]["d.png"] == "a triangle"
    assert (parts / "rank-00003.csv").read_text().splitlines() == ["c.png,a square,", "d.png,a triangle,"]


# ---------------------------------------------------------------------------
# Training under torchrun
# ---------------------------------------------------------------------------


def _logged_losses(run: Path) -> list[float]:
    newest = max((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((newest / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def _first_batches(log: str) -> dict[int, tuple[int, list[str]]]:
    found = re.findall(r"Rank (\d+) trains on (\d+) examples per epoch; first batch: (.*)", log)
    return {int(r): (int(n), names.strip().split(", ")) for r, n, names in found}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, train_cmd):
    """A 2-process training run, no --run_name (the name is rank 0's timestamp), caption metric for the best model."""
    out = tmp_path_factory.mktemp("dist_runs")
    args = train_cmd(out, "unused", "--max_steps", "8", "--eval_steps", "4", "--learning_rate", "2e-2",
                     "--lora_r", "8", "--logging_steps", "1", "--metric_for_best_model", "cider")
    i = args.index("--run_name")
    del args[i:i + 2]
    result = launch(args)
    assert result.returncode == 0, result.stdout[-4000:]
    return out, result.stdout


def test_two_processes_train_into_one_run_folder(two_rank_run, tiny_model_dir, data_dir):
    out, log = two_rank_run
    runs = [p for p in out.iterdir()]
    assert len(runs) == 1 and runs[0].name.startswith("run-"), runs  # one agreed name, one folder
    run = runs[0]
    settings = json.loads((run / "run_config.json").read_text())
    assert settings["world_size"] == 2 and settings["effective_batch_size"] == 4 * 1 * 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 8 and {"before", "after", "val_loss"} <= metrics.keys()
    assert log.count("effective batch 8 images per optimizer step") == 1  # stated once, by rank 0
    assert len(list((run / "logs").glob("events.out.tfevents.*"))) >= 1
    assert {p.name for p in (run / "checkpoints" / "checkpoint-8").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}

    losses = _logged_losses(run)
    assert len(losses) == 8 and losses[-1] < losses[0]  # the loss goes down

    # Each rank gets half of the 72 training examples per epoch, and their first batches differ.
    shards = _first_batches(log)
    assert set(shards) == {0, 1} and shards[0][0] == shards[1][0] == 36
    assert shards[0][1] != shards[1][1] and len(shards[0][1]) == 4

    # final_model loads in plain PEFT on the plain base and changes its outputs.
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    from PIL import Image

    image = Image.open(data_dir / "test" / "img_00000.png").convert("RGB")
    batch = processor(images=[image], text=["a red circle"], return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        before = base(**batch).logits
        tuned = PeftModel.from_pretrained(base, str(run / "final_model")).eval()
        after = tuned(**batch).logits
    assert (after - before).abs().max() > 1e-3


def test_resume_under_two_processes(two_rank_run, train_cmd):
    out, _ = two_rank_run
    run = next(out.iterdir())
    args = train_cmd(out, run.name, "--max_steps", "12", "--eval_steps", "4", "--learning_rate", "2e-2",
                     "--logging_steps", "1", "--resume")
    result = launch(args)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Resuming from" in result.stdout and "checkpoint-8" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 12 and "before" in metrics
    assert [p for p in out.iterdir()] == [run]


def test_a_bad_model_fails_on_every_rank_and_leaves_no_folder(tmp_path, train_cmd):
    args = train_cmd(tmp_path, "bad", "--max_steps", "1", "--model_name", str(tmp_path / "no_such_model"))
    start = time.perf_counter()
    result = launch(args, timeout=120)
    assert result.returncode != 0
    # A clean exit 2 with the one-paragraph error (torchrun adds its own report). torchrun stops the other rank
    # as soon as one exits, so the second rank's copy of the message may or may not get printed.
    assert result.stdout.count(f"error: --model_name {tmp_path / 'no_such_model'}: no such file or folder") >= 1
    assert re.search(r"exitcode\s*: 2 ", result.stdout)
    assert not (tmp_path / "bad").exists()
    assert time.perf_counter() - start < 120


def test_an_existing_run_folder_stops_every_rank(tmp_path, train_cmd):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "keep.txt").write_text("mine")
    result = launch(train_cmd(tmp_path, "r1", "--max_steps", "1"), timeout=120)
    assert result.returncode != 0 and "already exists" in result.stdout and re.search(r"exitcode\s*: 2 ", result.stdout)
    assert [p.name for p in (tmp_path / "r1").iterdir()] == ["keep.txt"]


def test_failed_start_leaves_no_run_folder_single_process(tmp_path, train_cmd, capsys):
    assert main(train_cmd(tmp_path, "r1", "--max_steps", "1", "--model_name", str(tmp_path / "nope"))) == 2
    assert "--model_name" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists()
    assert main(train_cmd(tmp_path, "r2", "--max_steps", "1", "--lora_target_modules", "nope")) == 2
    assert not (tmp_path / "r2").exists()


# ---------------------------------------------------------------------------
# Captioning and evaluation under torchrun; resumable captioning
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_images(tmp_path_factory, data_dir) -> Path:
    """240 images (the 32 fixtures, copied into sub-folders), enough to interrupt a captioning job."""
    import shutil

    folder = tmp_path_factory.mktemp("many")
    pictures = sorted((data_dir / "train").glob("*.png")) + sorted((data_dir / "test").glob("*.png"))
    for i in range(240):
        target = folder / f"part{i % 3}" / f"{i:04d}_{pictures[i % len(pictures)].name}"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(pictures[i % len(pictures)], target)
    return folder


def _caption_args(run: Path, folder: Path, target: Path, *extra: str) -> list[str]:
    return ["--inference", "--test_dir", str(folder), "--output_dir", str(run), "--predictions_file", str(target),
            "--num_workers", "0", "--max_new_tokens", "12", *extra]


@pytest.fixture(scope="module")
def single_process_captions(trained_run, many_images, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("single") / "captions.csv"
    assert main(_caption_args(trained_run, many_images, target, "--batch_size", "4")) == 0
    return target


def test_two_process_captions_equal_single_process(trained_run, many_images, single_process_captions, tmp_path):
    target = tmp_path / "captions.csv"
    result = launch(_caption_args(trained_run, many_images, target, "--batch_size", "4"))
    assert result.returncode == 0, result.stdout[-4000:]
    assert target.read_bytes() == single_process_captions.read_bytes()
    assert not caption_parts_dir(target).exists()
    assert "Captioned 240 images (0 skipped)" in result.stdout and "on 2 process(es)" in result.stdout


def test_interrupted_captioning_resumes_to_the_same_file(trained_run, many_images, single_process_captions, tmp_path):
    target = tmp_path / "captions.csv"
    parts = caption_parts_dir(target)
    process = subprocess.Popen(_command(_caption_args(trained_run, many_images, target, "--batch_size", "2"), 2),
                               cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while sum(len(p.read_bytes().splitlines()) for p in parts.glob("rank-*.csv")) < 20:
            assert process.poll() is None, "captioning ended before it could be interrupted"
            assert time.monotonic() < deadline, "no captions appeared in the part files"
            time.sleep(0.05)
    finally:
        _kill_tree(process)  # every rank, at once, mid-job
    done, _ = read_caption_parts(parts)
    assert 20 <= len(done) < 240 and not target.exists()
    with open(parts / "rank-00001.csv", "a", encoding="utf-8") as handle:
        handle.write("part0/0000_img_00000.png,a half-writ")  # as if killed mid-write

    # Without --resume the leftover parts are an error, never silently overwritten.
    again = launch(_caption_args(trained_run, many_images, target, "--batch_size", "2"), nproc=1, timeout=120)
    assert again.returncode == 2 and "--resume" in again.stdout and "Traceback" not in again.stdout

    # Resumed with another world size (2 -> 3 processes): only the rest is captioned.
    resumed = launch(_caption_args(trained_run, many_images, target, "--batch_size", "2", "--resume"), nproc=3)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"--resume: {len(done)} of 240 images already done" in resumed.stdout
    assert f"Captioned {240 - len(done)} images (0 skipped)" in resumed.stdout
    assert target.read_bytes() == single_process_captions.read_bytes()  # every image once, sorted, same captions
    assert not parts.exists()


def _close(a, b, tol=1e-5) -> bool:
    """Equal JSON values, floats to tol (CLIP embeds each rank's share in other batches: last-digit differences)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def test_eval_under_two_processes_equals_single_process(trained_run, data_dir, tmp_path, tiny_clip_dir):
    import shutil

    results = {}
    for nproc in (1, 2):
        run = tmp_path / f"run{nproc}"
        shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "merged_model"))
        args = ["--eval", "--test_dir", str(data_dir / "test"), "--captions_file", str(data_dir / "captions.csv"),
                "--output_dir", str(run), "--num_workers", "0", "--max_new_tokens", "8", "--batch_size", "3",
                "--fgd_model", "none", "--clip_model", str(tiny_clip_dir), "--java", "none"]
        if nproc == 1:
            assert main(args) == 0
        else:
            result = launch(args)
            assert result.returncode == 0, result.stdout[-4000:]
        results[nproc] = run
    one, two = (json.loads((results[n] / "eval_results.json").read_text()) for n in (1, 2))
    assert _close({k: v for k, v in one.items() if k != "settings"}, {k: v for k, v in two.items() if k != "settings"})
    assert one["num_images"] == 8 and one["clip_images"] == 8 and len(two["per_image"]["clip_score"]) == 8
    assert (results[1] / "eval_predictions.csv").read_bytes() == (results[2] / "eval_predictions.csv").read_bytes()


def test_single_process_modes_refuse_a_launcher(trained_run, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--merge_weights", "--output_dir", str(trained_run)]) == 2
    assert "runs in one process" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["--merge_weights", "--output_dir", str(trained_run), "--resume"]) == 2
    assert "--resume continues --train" in capsys.readouterr().err


def test_resume_keeps_done_captions_and_refuses_other_settings(trained_run, data_dir, tmp_path, capsys):
    target = tmp_path / "captions.csv"
    parts = caption_parts_dir(target)
    with CaptionPartWriter(parts, 5) as part:  # left by rank 5 of a bigger job
        part.append({"img_00000.png": "a caption from before"}, {"img_00001.png": "cannot identify image file"})
    args = ["--inference", "--test_dir", str(data_dir / "test"), "--output_dir", str(trained_run),
            "--predictions_file", str(target), "--num_workers", "0", "--max_new_tokens", "8"]
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err and not target.exists()
    assert main(args + ["--resume"]) == 0
    with open(target, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    names = [row[0] for row in rows[1:]]
    assert names == sorted(set(names)) and len(names) == 7  # 8 images, one recorded as unreadable
    assert rows[1] == ["img_00000.png", "a caption from before"]  # not captioned again
    assert not parts.exists()

    with CaptionPartWriter(parts, 0) as part:
        part.append({"img_00000.png": "x"}, {})
    assert main(args + ["--resume"]) == 0  # same settings as job.json? none written yet: accepted
    with CaptionPartWriter(parts, 0) as part:
        part.append({"img_00000.png": "x"}, {})
    (parts / "job.json").write_text(json.dumps({"max_new_tokens": 20}))
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens: 20 now 8" in err and "Traceback" not in err


def _helper_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of a 2-process gloo group (no launcher): exercises the collectives of utils/distributed."""
    import torch.distributed as dist

    from utils import distributed
    from utils.errors import UserInputError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    report = {"name": distributed.broadcast_object(f"run-from-rank-{rank}"),
              "gathered": distributed.all_gather_object(rank * 10),
              "value": distributed.run_on_main(lambda: f"computed on rank {distributed.rank()}")}
    try:
        distributed.run_on_main(lambda: (_ for _ in ()).throw(UserInputError("bad --flag")))
    except UserInputError as error:
        report["error"] = str(error)
    distributed.shutdown()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(report))


def test_collectives_agree_on_every_rank(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_helper_worker, args=(r, str(tmp_path / "init"), str(tmp_path))) for r in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    alive = [w for w in workers if w.is_alive()]
    for worker in alive:
        worker.kill()
    assert not alive, "a rank hangs"
    reports = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report == {"name": "run-from-rank-0", "gathered": [0, 10], "value": "computed on rank 0",
                          "error": "bad --flag"}
