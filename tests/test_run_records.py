"""What a --train run tells and keeps, seen from a log file (stderr not a terminal): progress lines, one final
validation pass, each warning once, `Run folder:` only for a folder that exists, RUN/splits/, file permissions."""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from git_qlora_main import main
from utils.io import give_default_permissions, read_split_names, replace_folder_atomically, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
MISSING_ENCODER = "/nonexistent/fgd-encoder"


def _run_logged(args: list[str], log: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", GOMP_SPINCOUNT="1000", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    with open(log, "w", encoding="utf-8") as stderr:  # a file, as under nohup or a scheduler
        result = subprocess.run([sys.executable, "git_qlora_main.py", *args], cwd=REPO, env=env, stderr=stderr,
                                stdout=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 0, log.read_text()[-3000:]
    return result


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, train_cmd):
    """(run folder, its --train log): the feature cache on, evaluations at steps 6 and 12 choosing by CIDEr-D,
    and an FGD encoder that cannot be loaded."""
    out = tmp_path_factory.mktemp("logged")
    log = out / "train.log"
    _run_logged(train_cmd(out, "r1", "--max_steps", "12", "--eval_steps", "6", "--metric_for_best_model", "cider",
                          "--cache_image_features", "on", "--fgd_model", MISSING_ENCODER), log)
    return out / "r1", log.read_text(encoding="utf-8")


def test_cache_filling_logs_progress_lines_with_done_and_total(logged_run):
    _, log = logged_run
    lines = re.findall(r"Caching image features: (\d+)/(\d+) images \((\d+)%\), ([\d.]+) images/s, (.*)", log)
    assert [(done, total, pct) for done, total, pct, _, _ in lines] == [("16", "32", "50"), ("32", "32", "100")]
    assert lines[0][4].startswith("about") and lines[0][4].endswith("left") and lines[-1][4].startswith("done in")
    assert float(lines[-1][3]) > 0
    assert "\r" not in log and "█" not in log and "it/s]" not in log  # no progress bar in a log file


def test_the_last_validation_pass_runs_once(logged_run):
    run, log = logged_run
    # Before training, at step 6 and at step 12; the final metrics reuse the evaluation of the chosen checkpoint.
    assert log.count("Validation captioning: 8/8 images (100%)") == 3
    assert len(re.findall(r"step \d+: eval_loss", log)) == 2
    metrics = json.loads((run / "metrics.json").read_text())
    state = json.loads(next((run / "checkpoints").glob("checkpoint-12/trainer_state.json")).read_text())
    best = int(state["best_model_checkpoint"].rsplit("-", 1)[1])
    evaluation = {k: v for e in state["log_history"] if e.get("step") == best for k, v in e.items()}
    assert metrics["val_loss"] == pytest.approx(evaluation["eval_loss"])
    assert metrics["after"]["cider"] == pytest.approx(evaluation["eval_cider"])  # the chosen checkpoint's captions
    assert metrics["after"]["fgd"] is None and MISSING_ENCODER in metrics["after"]["fgd_note"]


def test_an_unloadable_fgd_encoder_is_reported_once(logged_run):
    _, log = logged_run
    assert log.count("could not be loaded") == 1
    assert re.search(r"WARNING utils.evaluation: FGD not computed: text encoder '/nonexistent/fgd-encoder'", log)


def test_run_folder_is_logged_once_it_exists_and_not_for_a_run_that_never_made_it(logged_run, tmp_path, train_cmd,
                                                                                    caplog):
    run, log = logged_run
    first = log.index("Run folder: ")
    assert log.count("Run folder: ") == 2 and first > log.index("Settings: ")  # created, and at the very end
    assert log[first:].startswith(f"Run folder: {run.resolve()}")
    captions = tmp_path / "other.csv"
    captions.write_text("image_name,caption\nnot_here.jpg,a cat\n")
    with caplog.at_level(logging.INFO):
        assert main(train_cmd(tmp_path, "never", "--captions_file", str(captions))) == 2
    assert not (tmp_path / "never").exists()
    assert "Run folder" not in caplog.text and "Settings: " in caplog.text


def test_image_lists_live_in_splits_with_count_and_hash_in_run_config(logged_run, data_dir):
    run, _ = logged_run
    settings = json.loads((run / "run_config.json").read_text())
    assert "val_images" not in settings
    expected = {"validation": sorted(p.name for p in (data_dir / "test").glob("*.png")),
                "train": sorted(p.name for p in (data_dir / "train").glob("*.png"))}
    for split, names in expected.items():
        text = (run / "splits" / f"{split}.txt").read_text(encoding="utf-8")
        assert text.splitlines() == names
        assert settings["splits"][split] == {"file": f"splits/{split}.txt", "images": len(names),
                                             "sha256": hashlib.sha256(text.encode()).hexdigest()}
        assert read_split_names(run, settings, split) == names
    assert len(json.dumps(settings)) < 4000  # no list of names however many images


def test_old_runs_that_listed_validation_images_in_run_config_stay_readable(tmp_path, caplog):
    assert read_split_names(tmp_path, {"val_images": ["b.png", "a.png"]}) == ["b.png", "a.png"]
    assert read_split_names(tmp_path, {}) == [] and read_split_names(tmp_path, {}, "train") == []
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "validation.txt").write_text("x.png\n")
    assert read_split_names(tmp_path, {"splits": {"validation": {"sha256": "0" * 64}}}) == ["x.png"]
    assert "does not match the hash" in caplog.text


def test_every_file_of_the_run_has_the_same_permissions(logged_run):
    run, _ = logged_run
    modes = {p.relative_to(run).as_posix(): p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    assert {"final_model/adapter_model.safetensors", "checkpoints/checkpoint-6/adapter_model.safetensors"} <= set(modes)
    assert set(modes.values()) == {modes["run_config.json"]}, modes


def test_atomic_writers_give_files_the_umask_mode_not_0600(tmp_path):
    previous = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        folder = tmp_path / ".model.tmp"
        folder.mkdir()
        save_file({"w": __import__("torch").zeros(2)}, str(folder / "model.safetensors"))  # safetensors: 0600
        script = folder / "run.sh"
        script.write_text("#!/bin/sh\n")
        script.chmod(0o700)
        assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o600
        replace_folder_atomically(folder, tmp_path / "model")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "model" / "run.sh").stat().st_mode & 0o777 == 0o750  # executable stays executable
    (tmp_path / "a.txt").chmod(0o600)
    give_default_permissions(tmp_path / "a.txt")  # under the test's own umask now
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~previous


def test_captioning_logs_progress_lines_and_no_bar_in_a_log_file(logged_run, data_dir, tmp_path):
    run, _ = logged_run
    log = tmp_path / "inference.log"
    _run_logged(["--inference", "--output_dir", str(run), "--test_dir", str(data_dir / "test"), "--batch_size", "2",
                 "--num_workers", "0", "--predictions_file", str(tmp_path / "captions.csv")], log)
    text = log.read_text(encoding="utf-8")
    lines = re.findall(r"Captioning: (\d+)/8 images \((\d+)%\)", text)
    assert lines == [("2", "25"), ("4", "50"), ("6", "75"), ("8", "100")]
    assert "\r" not in text and "█" not in text and "it/s]" not in text
