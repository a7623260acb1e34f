"""`--demo` end to end (reduced and full scale), its folder handling, and the base model's pretraining."""

import csv
import dataclasses
import json
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from git_qlora_main import main
from models.caption_speed import int8_unavailable
from models.small_git import (
    PretrainSettings,
    SmallGitSize,
    build_small_git,
    init_vision_positions,
    pretrain_small_git,
    sincos_position_table,
)
from scripts.demo import DEMO_ENTRIES, DemoPlan, check_targets, demo_fgd_model, prepare_demo_dir
from scripts.inference import generate_captions
from utils import demo_data
from utils.config import Config

STAGES = ("data", "base_model", "eval_before", "train", "eval_after", "inference", "inference_fp32", "inference_int8", "merge")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One thread: torch's OpenMP threads spin while waiting, and on two cores shared with another busy
    process a demo step took ~100x longer (3.5 s, not 30 ms). scripts/demo.py shortens the spin for the
    CLI, but here torch was imported (by conftest) before it could. One thread costs ~1.4x when idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _check_data_folder(data, plan: DemoPlan):
    assert len(list((data / "train").glob("*.png"))) == plan.train_images
    assert len(list((data / "test").glob("*.png"))) == plan.test_images
    rows = _read_rows(data / "captions.csv")
    names = {row["image_name"] for row in rows}
    # A user's format: one captions file for both folders, names relative to it, several captions per picture.
    assert all((data / name).is_file() and name.split("/")[0] in ("train", "test") for name in names)
    assert len(rows) == 3 * len(names) == 3 * (plan.train_images + plan.test_images)


def test_demo_at_reduced_scale_runs_every_mode(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "demo"
    assert main(["--demo", "--output_dir", str(out), "--demo_scale", "0.05"]) == 0
    plan = DemoPlan().scaled(0.05)
    _check_data_folder(out / "data", plan)

    report = json.loads((out / "demo_report.json").read_text())
    assert {"before", "after", "seconds", "samples", "distinct_captions", "targets", "merge", "fast_vs_fp32"} <= report.keys()
    # The exact path's captions were written beside the fast path's, and the agreement counts both files.
    fast, exact = ({r["image_name"]: r["caption"] for r in _read_rows(out / "run" / f)} for f in ("captions.csv", "captions_fp32.csv"))
    assert len(exact) == plan.test_images and report["fast_vs_fp32"]["caption_agreement"] == sum(
        fast[n] == c for n, c in exact.items()) / len(exact)
    # The int8 stage runs where int8 can (torchao installed, a CPU with VNNI or AMX); elsewhere it is left out.
    int8_runs = int8_unavailable("cpu") is None
    stages = set(STAGES) - (set() if int8_runs else {"inference_int8"})
    assert set(report["seconds"]) == stages | {"total"} and all(s >= 0 for s in report["seconds"].values())
    if int8_runs:
        int8 = {r["image_name"]: r["caption"] for r in _read_rows(out / "run" / "captions_int8.csv")}
        assert report["precisions_vs_fp32"]["int8"]["caption_agreement"] == sum(int8[n] == c for n, c in exact.items()) / len(exact)
    else:
        assert "int8" not in report["precisions_vs_fp32"] and not (out / "run" / "captions_int8.csv").exists()
        assert "The int8 stage is left out" in caplog.text
    assert report["precisions_vs_fp32"]["auto"]["caption_agreement"] == report["fast_vs_fp32"]["caption_agreement"]
    merge = json.loads((out / "run" / "merge_report.json").read_text())
    assert 0 <= merge["precisions_vs_fp32"]["auto"]["caption_agreement"] <= 1
    for when, folder in (("before", out / "eval_before"), ("after", out / "run")):
        results = json.loads((folder / "eval_results.json").read_text())
        assert report[when] == {k: v for k, v in results.items() if k != "settings"}
        assert {"bleu_4", "cider", "rouge_l", "fgd"} <= report[when].keys()
        assert report[when]["num_images"] == plan.test_images
        assert len(_read_rows(folder / "eval_predictions.csv")) == plan.test_images
    assert report["after"]["fgd"] is None  # offline, no local encoder given
    # The run's --eval pairs its captions with the base model's of the same pictures (its val_predictions.csv).
    change = report["after"]["change"]["cider"]
    assert change["low"] <= change["value"] <= change["high"] and change["significant"] == (change["low"] > 0 or change["high"] < 0)
    assert change["value"] == pytest.approx(report["after"]["cider"] - report["after"]["base_model"]["cider"])
    assert report["distinct_captions"]["test_images"] == plan.test_images
    sample = report["samples"][0]
    assert {"image", "before", "after", "references"} <= sample.keys() and len(sample["references"]) == 3

    # The base model loads like a hub checkpoint; the run holds an adapter, captions and a merged model.
    assert AutoModelForCausalLM.from_pretrained(out / "base_model").config.model_type == "git"
    assert (out / "run" / "final_model" / "adapter_model.safetensors").is_file()
    assert len(_read_rows(out / "run" / "captions.csv")) == plan.test_images
    assert (out / "run" / "merged_model" / "config.json").is_file()
    assert list((out / "run" / "merged_model").glob("*.safetensors"))
    assert json.loads((out / "run" / "run_config.json").read_text())["quantization_bits"] == 4

    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "seconds per stage" in printed
    assert "Demo stage 7" in caplog.text and "Pretraining" not in printed


def test_demo_folder_is_reused_but_a_foreign_one_is_refused(tmp_path, capsys):
    earlier = tmp_path / "earlier"
    for name in ("data", "run"):
        (earlier / name).mkdir(parents=True)
    (earlier / "demo_report.json").write_text("{}")
    prepare_demo_dir(earlier)
    assert earlier.is_dir() and not any(earlier.iterdir())
    assert set(DEMO_ENTRIES) >= {"data", "base_model", "eval_before", "run", "demo_report.json"}

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep")
    assert main(["--demo", "--output_dir", str(mine)]) == 2
    assert "thesis.txt" in capsys.readouterr().err and (mine / "thesis.txt").read_text() == "keep"


def test_demo_plan_scaling_and_targets():
    assert DemoPlan().scaled(1.0) == DemoPlan()
    small = DemoPlan().scaled(0.01)
    assert small.train_images >= 8 and small.test_images >= 4 and small.pretrain.steps >= 20 and small.train_steps >= 4
    assert small.pretrain.warmup_steps <= small.pretrain.steps
    targets = check_targets({"bleu_4": 0.2, "cider": 1.5}, {"bleu_4": 0.6, "cider": 2.4}, distinct_after=5)
    assert targets["bleu_4_after"]["met"] and targets["distinct_captions_after"]["met"]
    assert not targets["cider_gain"]["met"] and targets["cider_gain"]["value"] == pytest.approx(0.9)


def test_demo_uses_fgd_only_with_a_local_encoder(tmp_path):
    assert demo_fgd_model(Config(mode="demo")) is None  # the hub default cannot load offline
    assert demo_fgd_model(Config(mode="demo", fgd_model=str(tmp_path))) == str(tmp_path)
    online = Config(mode="demo", model_name="microsoft/git-base")
    assert demo_fgd_model(online) == online.fgd_model


def test_sincos_positions_tell_every_patch_apart(tiny_model_dir):
    table = sincos_position_table(4, 128)
    assert table.shape == (16, 128) and torch.cdist(table, table).add(torch.eye(16)).min() > 0.5
    # Over a 4 x 4 grid, temperature 4 moves every frequency; 10000 leaves the slow half almost constant.
    spread = {t: torch.cdist(c, c).add(torch.eye(16) * 1e9).min() for t in (4.0, 10000.0)
              for c in [sincos_position_table(4, 128, t)]}
    assert spread[4.0] > 1.5 * spread[10000.0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    init_vision_positions(model)
    weight = model.git.image_encoder.vision_model.embeddings.position_embedding.weight
    assert torch.equal(weight[0], torch.zeros_like(weight[0])) and torch.equal(weight[1:], sincos_position_table(2, 64))


def test_pretraining_makes_the_base_model_look_at_the_picture(tmp_path):
    """After a short pretraining with the demo's start (weights at 0.1, no dropout, positions coded over the grid)
    the small GIT names colours and also where the shape is. With GitConfig's 0.02-scale start, positions stayed at
    chance (1 in 3) for the first 600 steps: its decoder attended evenly over the image tokens."""
    plan = DemoPlan()
    folder = build_small_git(tmp_path / "base", demo_data.every_caption(), plan.model_size(), seed=0)
    examples = demo_data.generate_base_examples(1000, seed=0)
    settings = dataclasses.replace(plan.pretrain, steps=300, warmup_steps=40, seed=0)
    stats = pretrain_small_git(folder, examples, settings)
    assert stats["final_loss"] < stats["first_loss"] / 2

    processor, model = AutoProcessor.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    scenes = [demo_data.Scene(c, "circle", p) for c in demo_data.COLOURS for p in demo_data.POSITIONS] * 2
    pictures = [demo_data.draw_scene(scene, random.Random(i)) for i, scene in enumerate(scenes)]
    captions = generate_captions(model, processor, pictures, max_new_tokens=10)
    colours = sum(caption.split()[1:2] == [scene.colour] for caption, scene in zip(captions, scenes)) / len(scenes)
    places = sum(caption.split()[-1:] == [scene.position] for caption, scene in zip(captions, scenes)) / len(scenes)
    # One caption for every picture (mode collapse) would be right for 1 in 5 colours and 1 in 3 places.
    assert len(set(captions)) >= 3 and colours >= 0.6 and places >= 0.6, captions


def test_no_two_caption_continuations_are_a_coin_toss():
    """Greedy captioning follows the most frequent way on from each beginning the training captions share. Where two
    ways were exactly as frequent, the model learnt a tie, and the bf16 and fp32 paths broke it differently."""
    import collections
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as root:
        rows = _read_rows(demo_data.write_demo_dataset(Path(root), 300, 0, seed=0, size=16) / "captions.csv")
    # What the picture decides is one symbol: the model reads it off the picture, it does not choose it.
    words = {w: "<" + kind + ">" for kind, names in (("colour", demo_data.COLOURS), ("shape", demo_data.SHAPES)) for w in names}
    ways = collections.defaultdict(collections.Counter)
    for row in rows:
        caption = re.sub(r"in the middle|on the (left|right)", "<where>", row["caption"])
        tokens = [words.get(w, w) for w in caption.split()] + ["[SEP]"]
        for k in range(len(tokens)):
            ways[tuple(tokens[:k])][tokens[k]] += 1
    branches = {prefix: counts.most_common(2) for prefix, counts in ways.items() if len(counts) > 1}
    assert branches  # the three phrasings do share beginnings
    for prefix, ((_, first), (_, second)) in branches.items():
        assert first >= 1.3 * second, (prefix, ways[prefix])


@pytest.mark.slow
def test_full_demo_shows_learning(tmp_path):
    """The command as a user types it, in its own process: torch with its default threads and OpenMP settings (this
    module's one-thread fixture would change the numerics the fast and fp32 paths are compared under)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "demo"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GIT_QLORA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(root / "git_qlora_main.py"), "--demo", "--output_dir", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "demo_report.json").read_text())
    assert report["after"]["bleu_4"] >= 0.5, report["after"]
    assert report["after"]["cider"] - report["before"]["cider"] >= 1.0, (report["before"], report["after"])
    assert report["distinct_captions"]["after"] >= 5
    assert report["before"]["bleu_4"] < report["after"]["bleu_4"] - 0.2  # the style really was new to the base
    assert all(target["met"] for target in report["targets"].values()) and report["targets_apply"]
    assert report["seconds"]["total"] < 600
    assert report["fast_vs_fp32"]["caption_agreement"] >= 0.95 and report["fast_vs_fp32"]["images"] == 60
    change = report["after"]["change"]["cider"]  # paired bootstrap interval of after - before, same 60 pictures
    assert change["significant"] and change["low"] > 0, change


def test_the_pretrained_base_model_is_kept_in_the_user_cache_and_reused(tmp_path, monkeypatch, caplog):
    import scripts.demo as demo

    monkeypatch.setenv("GIT_QLORA_CACHE", str(tmp_path / "cache"))
    plan = DemoPlan().scaled(0.01)
    first = demo.obtain_base_model(tmp_path / "a", plan, seed=3)
    assert first["cached_copy"] is None
    entries = list((tmp_path / "cache" / "demo_base_model").iterdir())
    assert len(entries) == 1 and (entries[0] / "cache_manifest.json").is_file()

    def no_pretraining(*args):
        raise AssertionError("the cached base model should have been reused")

    monkeypatch.setattr(demo, "build_base_model", no_pretraining)
    second = demo.obtain_base_model(tmp_path / "b", plan, seed=3)
    assert second["cached_copy"] == str(entries[0]) and second["final_loss"] == first["final_loss"]
    for name in ("model.safetensors", "config.json", "vocab.txt"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    assert not (tmp_path / "b" / "cache_manifest.json").exists()
    # Another seed is another model: never served from this entry.
    with pytest.raises(AssertionError, match="should have been reused"):
        demo.obtain_base_model(tmp_path / "c", plan, seed=4)


def test_a_damaged_cached_base_model_is_rebuilt_not_used(tmp_path, monkeypatch, caplog):
    import scripts.demo as demo

    monkeypatch.setenv("GIT_QLORA_CACHE", str(tmp_path / "cache"))
    plan = DemoPlan().scaled(0.01)
    demo.obtain_base_model(tmp_path / "a", plan, seed=3)
    (entry,) = (tmp_path / "cache" / "demo_base_model").iterdir()
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # a torn write: the last weights zeroed
    weights.write_bytes(bytes(data))
    rebuilt = demo.obtain_base_model(tmp_path / "b", plan, seed=3)
    assert rebuilt["cached_copy"] is None
    assert "does not match its manifest" in caplog.text
    assert (tmp_path / "b" / "model.safetensors").read_bytes() != bytes(data)
    # The entry was replaced by a good copy, which the next run reuses.
    assert demo.obtain_base_model(tmp_path / "c", plan, seed=3)["cached_copy"] == str(entry)
