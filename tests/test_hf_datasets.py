"""--dataset sources (parquet, arrow on disk, JSONL, WebDataset shards, streaming) give the folder's examples and run."""

import csv
import io
import json
import logging
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from git_qlora_main import main
from utils.dataset_utils import CaptionDataset, collect_examples, load_image
from utils.errors import UserInputError
from utils.hf_datasets import DatasetSpec, StreamingCaptionDataset, load_eval_split, load_streaming_train, load_train_and_eval

CORRUPT = "corrupt.png"


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    """Keep the `datasets` cache (the arrow copies of local files) out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets_cache")


def _folder_examples(data_dir, split):
    return collect_examples(data_dir / split, data_dir / "captions.csv", flag="--train_dir")


def _by_image(examples):
    out = {}
    for e in examples:
        out.setdefault(e.image_name, []).append(e.caption)
    return out


def _png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _rows(data_dir, split):
    """(image name, PNG bytes, [captions]) of a folder split, from the demo's captions.csv."""
    by_image = _by_image(_folder_examples(data_dir, split))
    return [(name, _png_bytes(data_dir / split / name), caps) for name, caps in sorted(by_image.items())]


@pytest.fixture(scope="module")
def parquet_dir(data_dir, tmp_path_factory) -> Path:
    """train-00000.parquet ({bytes, path} struct, text, captions list, one corrupt image) and test-00000.parquet."""
    root = tmp_path_factory.mktemp("parquet")
    for split in ("train", "test"):
        rows = _rows(data_dir, split)
        if split == "train":
            rows.append((CORRUPT, b"\x89PNG\r\n\x1a\n not really a png", ["a picture that cannot be decoded"]))
        table = pa.table({
            "image": [{"bytes": data, "path": name} for name, data, _ in rows],
            "text": [caps[0] for _, _, caps in rows],
            "captions": [caps for _, _, caps in rows],
            "file_name": [name for name, _, _ in rows],
        })
        pq.write_table(table, root / f"{split}-00000.parquet")
    return root


@pytest.fixture(scope="module")
def webdataset_shards(data_dir, tmp_path_factory) -> Path:
    """Two WebDataset shards of the training pictures: KEY.png, KEY.txt (first caption), KEY.json (all captions)."""
    root = tmp_path_factory.mktemp("wds")
    rows = _rows(data_dir, "train")
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard:05d}.tar", "w") as tar:
            for name, data, caps in rows[shard::2]:
                key = name.rsplit(".", 1)[0]
                for ext, payload in (("png", data), ("txt", caps[0].encode()), ("json", json.dumps({"caption": caps}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


@pytest.fixture(scope="module")
def jsonl_file(data_dir) -> Path:
    """train/data.jsonl beside the pictures: one {"file_name", "text"} line per caption."""
    path = data_dir / "train" / "data.jsonl"
    if not path.exists():
        lines = [json.dumps({"file_name": e.image_name, "text": e.caption}) for e in _folder_examples(data_dir, "train")]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _same_pixels(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------
# Each source gives the same examples and pixels as the folder + CSV
# ---------------------------------------------------------------------------


def test_parquet_struct_images_and_caption_lists_match_the_folder(parquet_dir, data_dir, caplog):
    spec = DatasetSpec(str(parquet_dir), caption_column="captions", id_column="file_name")
    train, val = load_train_and_eval(spec)  # test-00000.parquet is the validation split
    folder_train = _by_image(_folder_examples(data_dir, "train"))
    assert _by_image(train.examples) == {**folder_train, CORRUPT: ["a picture that cannot be decoded"]}
    assert _by_image(val.examples) == _by_image(_folder_examples(data_dir, "test"))
    name = sorted(folder_train)[3]
    assert _same_pixels(train.images.load(name)[0], load_image(data_dir / "train" / name)[0])
    # The corrupt image is skipped and named; the other examples still come out.
    with caplog.at_level(logging.WARNING):
        items = [CaptionDataset(train.images, train.examples)[i] for i in range(len(train.examples))]
    assert CORRUPT in caplog.text and all(item["image_name"] != CORRUPT for item in items)


def test_default_columns_row_ids_and_hold_out(parquet_dir):
    # Without --caption_column, `text` (one caption per row) is picked; names are stable row ids.
    spec = DatasetSpec(str(parquet_dir / "train-00000.parquet"), split_ratio=0.25)
    train, val = load_train_and_eval(spec)  # a single file: no validation split, so a hold-out by image
    names = {e.image_name for e in train.examples} | {e.image_name for e in val.examples}
    assert names == {f"train/{i:06d}" for i in range(25)}
    assert not {e.image_name for e in train.examples} & {e.image_name for e in val.examples}
    # --eval / --inference without --eval_split read exactly the images --train held out.
    assert {e.image_name for e in load_eval_split(spec).examples} == {e.image_name for e in val.examples}


def test_raw_binary_image_column(data_dir, tmp_path):
    rows = _rows(data_dir, "test")
    pq.write_table(pa.table({"jpg": [d for _, d, _ in rows], "caption": [c[0] for *_, c in rows]}), tmp_path / "raw.parquet")
    split = load_eval_split(DatasetSpec(str(tmp_path / "raw.parquet"), eval_split="train"))
    assert [e.caption for e in split.examples] == [c[0] for *_, c in rows]
    assert _same_pixels(split.images.load("train/000002")[0], load_image(data_dir / "test" / rows[2][0])[0])


def test_image_feature_saved_with_save_to_disk(data_dir, tmp_path):
    import datasets

    rows = _rows(data_dir, "test")
    ds = datasets.Dataset.from_dict({
        "image": [str(data_dir / "test" / n) for n, _, _ in rows], "sentences": [c for *_, c in rows],
        "name": [n for n, _, _ in rows],
    }).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    split = load_eval_split(DatasetSpec(str(tmp_path / "saved"), eval_split="train", id_column="name"))
    assert _by_image(split.examples) == _by_image(_folder_examples(data_dir, "test"))
    assert _same_pixels(split.images.load(rows[0][0])[0], load_image(data_dir / "test" / rows[0][0])[0])


def test_jsonl_paths_are_resolved_next_to_the_file(jsonl_file, data_dir):
    split = load_eval_split(DatasetSpec(str(jsonl_file), eval_split="train", id_column="file_name"))
    assert _by_image(split.examples) == _by_image(_folder_examples(data_dir, "train"))
    name = split.examples[0].image_name
    assert _same_pixels(split.images.load(name)[0], load_image(data_dir / "train" / name)[0])


def test_webdataset_shards(webdataset_shards, data_dir):
    pattern = str(webdataset_shards / "shard-*.tar")
    folder = _by_image(_folder_examples(data_dir, "train"))
    split = load_eval_split(DatasetSpec(pattern, eval_split="train"))  # png + txt: first caption, keyed by __key__
    assert _by_image(split.examples) == {n.rsplit(".", 1)[0]: c[:1] for n, c in folder.items()}
    split = load_eval_split(DatasetSpec(pattern, eval_split="train", caption_column="json"))  # all references
    assert _by_image(split.examples) == {n.rsplit(".", 1)[0]: c for n, c in folder.items()}
    assert _same_pixels(split.images.load("img_00001")[0], load_image(data_dir / "train" / "img_00001.png")[0])


def test_missing_column_is_an_error_listing_the_columns(parquet_dir):
    with pytest.raises(UserInputError) as error:
        load_eval_split(DatasetSpec(str(parquet_dir), caption_column="caption_en"))
    assert "--caption_column caption_en" in str(error.value) and "captions, file_name" in str(error.value)


# ---------------------------------------------------------------------------
# Streaming: each rank reads its own shards
# ---------------------------------------------------------------------------


def test_streaming_ranks_read_disjoint_shards(webdataset_shards):
    spec = DatasetSpec(str(webdataset_shards / "shard-*.tar"), streaming=True, shuffle_buffer=4)
    stream, val = load_streaming_train(spec)
    assert isinstance(stream, StreamingCaptionDataset) and val is None
    per_rank = [[item["image_name"] for item in stream.items(rank, 2)] for rank in (0, 1)]
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    everything = {item["image_name"] for item in stream.items(0, 1)}
    assert set(per_rank[0]) | set(per_rank[1]) == everything and len(everything) == 24
    # Whole shards each: one rank reads the even pictures (shard 0), the other the odd ones (shard 1).
    parities = [{int(n[-5:]) % 2 for n in names} for names in per_rank]
    assert sorted(map(sorted, parities)) == [[0], [1]]


def test_streaming_reshuffles_each_pass(webdataset_shards):
    stream, _ = load_streaming_train(DatasetSpec(str(webdataset_shards / "shard-*.tar"), streaming=True, shuffle_buffer=8))
    first = [item["image_name"] for item in stream]
    assert first == [item["image_name"] for item in stream]  # the same pass, the same order
    stream.set_epoch(1)
    second = [item["image_name"] for item in stream]
    assert sorted(first) == sorted(second) and first != second


def test_streaming_skips_corrupt_rows(parquet_dir, caplog):
    stream, val = load_streaming_train(DatasetSpec(str(parquet_dir), streaming=True, id_column="file_name", shuffle_buffer=0))
    with caplog.at_level(logging.WARNING):
        names = [item["image_name"] for item in stream]
    assert len(names) == 24 and CORRUPT not in names and CORRUPT in caplog.text
    assert val is not None and len(val.examples) == 8  # the test split, read into memory for validation


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


def test_flag_problems_are_reported_together(capsys, tmp_path):
    code = main(["--train", "--dataset", "x.parquet", "--train_dir", str(tmp_path), "--streaming", "--shuffle_buffer", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "give one of them" in err and "--streaming needs --max_steps" in err and "--shuffle_buffer" in err
    assert main(["--train", "--train_dir", str(tmp_path), "--image_column", "jpg"]) == 2
    assert "only apply with --dataset" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The CLI on each source
# ---------------------------------------------------------------------------


def _dataset_cmd(tiny_model_dir, out, *extra):
    return [
        "--train", "--model_name", str(tiny_model_dir), "--output_dir", str(out), "--batch_size", "4",
        "--num_workers", "0", "--fgd_model", "none", "--java", "none", "--max_new_tokens", "8", "--max_steps", "2", *extra,
    ]


def _csv_names(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [row[0] for row in list(csv.reader(f))[1:]]


def test_train_eval_inference_merge_on_parquet(parquet_dir, data_dir, tiny_model_dir, tmp_path):
    source = ["--dataset", str(parquet_dir), "--caption_column", "captions", "--id_column", "file_name"]
    assert main(_dataset_cmd(tiny_model_dir, tmp_path, "--run_name", "pq", *source)) == 0
    run = tmp_path / "pq"
    settings = json.loads((run / "run_config.json").read_text())
    assert settings["dataset"] == str(parquet_dir) and settings["num_train_examples"] == 25 * 3 - 2
    assert (run / "final_model" / "adapter_model.safetensors").is_file()
    assert main(["--eval", "--output_dir", str(run), "--fgd_model", "none", "--java", "none", "--max_new_tokens", "8", "--num_workers", "0", *source]) == 0
    names = _csv_names(run / "eval_predictions.csv")
    assert len(names) == 8 and all(n.startswith("img_") for n in names)
    assert json.loads((run / "eval_results.json").read_text())["num_images"] == 8
    assert main(["--inference", "--output_dir", str(run), "--max_new_tokens", "8", "--num_workers", "0", *source]) == 0
    assert _csv_names(run / "captions.csv") == names
    assert main(["--merge_weights", "--output_dir", str(run)]) == 0
    assert json.loads((run / "merge_report.json").read_text())["images"] == 8
    # A run trained on a dataset is evaluated on a folder just the same.
    assert main(["--eval", "--output_dir", str(run), "--test_dir", str(data_dir / "test"), "--captions_file",
                 str(data_dir / "captions.csv"), "--fgd_model", "none", "--java", "none", "--max_new_tokens", "8", "--num_workers", "0"]) == 0
    assert json.loads((run / "eval_results.json").read_text())["settings"]["test_dir"] == str(data_dir / "test")


def test_streaming_training_on_webdataset_shards(webdataset_shards, tiny_model_dir, tmp_path):
    shards = str(webdataset_shards / "shard-*.tar")
    assert main(_dataset_cmd(tiny_model_dir, tmp_path, "--run_name", "wds", "--dataset", shards, "--streaming",
                             "--shuffle_buffer", "8")) == 0
    metrics = json.loads((tmp_path / "wds" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and "after" not in metrics  # no validation split in the shards
    settings = json.loads((tmp_path / "wds" / "run_config.json").read_text())
    assert settings["streaming"] is True and settings["num_train_examples"] is None


def test_training_on_jsonl_and_folder_run_evaluated_on_a_dataset(jsonl_file, tiny_model_dir, trained_run, parquet_dir, tmp_path):
    assert main(_dataset_cmd(tiny_model_dir, tmp_path, "--run_name", "js", "--dataset", str(jsonl_file))) == 0
    assert json.loads((tmp_path / "js" / "run_config.json").read_text())["num_train_examples"] > 0
    # A run trained on a folder, scored on the parquet test split.
    out = tmp_path / "eval_of_folder_run"
    out.mkdir()
    for name in ("run_config.json", "final_model"):
        (out / name).symlink_to(trained_run / name)
    assert main(["--eval", "--output_dir", str(out), "--dataset", str(parquet_dir), "--caption_column", "captions",
                 "--id_column", "file_name", "--fgd_model", "none", "--java", "none", "--max_new_tokens", "8", "--num_workers", "0"]) == 0
    assert json.loads((out / "eval_results.json").read_text())["num_images"] == 8


# ---------------------------------------------------------------------------
# No silent hub waits
# ---------------------------------------------------------------------------


def _timed_main(argv):
    start = time.perf_counter()
    code = main(argv)
    return code, time.perf_counter() - start


def test_offline_hub_dataset_id_fails_in_seconds(tmp_path, tiny_model_dir, capsys):
    code, seconds = _timed_main(_dataset_cmd(tiny_model_dir, tmp_path, "--run_name", "hub", "--dataset", "someone/captions"))
    assert code == 2 and seconds < 20
    err = capsys.readouterr().err
    assert "--dataset 'someone/captions'" in err and "HF_HUB_OFFLINE" in err and "local file, folder or glob" in err


def test_unreachable_hub_model_fails_in_seconds(tmp_path, data_dir, monkeypatch, capsys):
    from huggingface_hub import constants

    import utils.hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # an online user whose network is down
    monkeypatch.setattr(utils.hub, "hub_unreachable_reason", lambda: "ConnectError: simulated")
    argv = ["--train", "--train_dir", str(data_dir / "train"), "--captions_file", str(data_dir / "captions.csv"),
            "--output_dir", str(tmp_path), "--run_name", "r", "--max_steps", "1"]  # default --model_name microsoft/git-base
    code, seconds = _timed_main(argv)
    assert code == 2 and seconds < 20
    assert "--model_name 'microsoft/git-base'" in capsys.readouterr().err


def test_failed_hub_run_leaves_no_run_folder(tmp_path, tiny_model_dir):
    assert main(_dataset_cmd(tiny_model_dir, tmp_path, "--run_name", "hub", "--dataset", "someone/captions")) == 2
    assert not (tmp_path / "hub").exists()


def test_cached_model_is_used_offline_when_the_hub_is_unreachable(monkeypatch, tmp_path, tiny_model_dir):
    import shutil

    import datasets
    from huggingface_hub import constants

    import utils.hub

    # A hub cache holding someorg/tiny-git (the layout huggingface_hub writes: refs/main -> snapshots/<commit>).
    repo = tmp_path / "models--someorg--tiny-git"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # an online user whose network is down
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)  # restored afterwards
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(utils.hub, "hub_unreachable_reason", lambda: "ConnectError: simulated")
    with pytest.raises(UserInputError, match="cannot be reached"):
        utils.hub.check_hub_name("someorg/not-cached", "--model_name")
    utils.hub.check_hub_name("someorg/tiny-git", "--model_name")  # no error: the cached copy is used, offline
    assert constants.HF_HUB_OFFLINE is True


def test_fgd_encoder_offline_gives_a_note_in_seconds():
    from utils.evaluation import compute_fgd

    start = time.perf_counter()
    result = compute_fgd(["a red circle", "a blue square"], ["a red circle", "a green star"], "thenlper/gte-small")
    assert result["fgd"] is None and "HF_HUB_OFFLINE" in result["fgd_note"]
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("source", ["webdataset", "save_to_disk"])
def test_training_on_webdataset_and_saved_dataset(source, webdataset_shards, data_dir, tiny_model_dir, tmp_path):
    if source == "webdataset":  # validation from a folder + captions file, as with --train_dir
        args = ["--dataset", str(webdataset_shards / "shard-*.tar"), "--caption_column", "json",
                "--test_dir", str(data_dir / "test"), "--captions_file", str(data_dir / "captions.csv")]
    else:
        import datasets

        rows = _rows(data_dir, "train")
        datasets.Dataset.from_dict({"image": [str(data_dir / "train" / n) for n, _, _ in rows],
                                    "caption": [c[0] for *_, c in rows]}).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
        args = ["--dataset", str(tmp_path / "saved")]
    assert main(_dataset_cmd(tiny_model_dir, tmp_path, "--run_name", source, *args)) == 0
    settings = json.loads((tmp_path / source / "run_config.json").read_text())
    if source == "webdataset":
        assert (settings["num_train_examples"], settings["num_val_examples"]) == (72, 24)
        assert settings["val_dir"] == str(data_dir / "test")
    else:
        assert settings["num_train_examples"] + settings["num_val_examples"] == 24


def test_img2dataset_folder_reads_the_shards_not_the_metadata(webdataset_shards, tmp_path):
    # img2dataset writes 00000.tar, 00000.parquet (metadata, no images) and 00000_stats.json per shard.
    import shutil

    for index, shard in enumerate(sorted(webdataset_shards.glob("*.tar"))):
        shutil.copy(shard, tmp_path / f"{index:05d}.tar")
        pq.write_table(pa.table({"key": ["x"], "caption": ["y"], "status": ["success"]}), tmp_path / f"{index:05d}.parquet")
        (tmp_path / f"{index:05d}_stats.json").write_text(json.dumps({"count": 12}))
    split = load_eval_split(DatasetSpec(str(tmp_path), eval_split="train"))
    assert len(split.images.names()) == 24 and split.images.load("img_00004")[0] is not None


RANK_SCRIPT = '''
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from git_qlora_main import build_config, build_parser
from models.git_qlora import load_base_model, load_processor, prepare_for_training
from scripts.trainer import build_trainer
from scripts.training_data import load_splits

shards, model_dir, out = sys.argv[2:5]
rank = int(os.environ["RANK"])
config = build_config(build_parser().parse_args([
    "--train", "--dataset", shards, "--streaming", "--max_steps", "3", "--model_name", model_dir, "--output_dir", out,
    "--batch_size", "2", "--num_workers", "0", "--fgd_model", "none", "--java", "none", "--shuffle_buffer", "0"]))
run_dir = Path(out) / f"rank{rank}"  # the CLI's run-folder agreement between ranks is issue 9's
run_dir.mkdir(parents=True, exist_ok=True)
splits = load_splits(config)
model = prepare_for_training(load_base_model(config, "cpu"), config)
trainer, _ = build_trainer(config, run_dir, model, load_processor(config.model_name), splits, None, "cpu")
seen, collate = [], trainer.data_collator
trainer.data_collator = lambda batch: seen.extend(item["image_name"] for item in batch) or collate(batch)
steps = trainer.train().global_step
(Path(out) / f"seen{rank}.json").write_text(json.dumps({"seen": seen, "steps": steps}))
from utils import distributed
# Leave as the CLI does. Without it, rank 0 once aborted after writing its result ("terminate called without an
# active exception" at interpreter exit, the gloo group never destroyed), failing the launch.
distributed.shutdown()
'''


def test_two_processes_train_on_disjoint_shards(webdataset_shards, tiny_model_dir, tmp_path):
    """torchrun, 2 CPU ranks, the real build_trainer: each rank trains on its own shard (Accelerate would
    otherwise dispatch rank 0's batches to both)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "rank_check.py"
    script.write_text(RANK_SCRIPT)
    repo = str(Path(__file__).resolve().parents[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), repo,
               str(webdataset_shards / "shard-*.tar"), str(tiny_model_dir), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"seen{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["steps"] for s in seen] == [3, 3]
    parities = [{int(name[-5:]) % 2 for name in s["seen"]} for s in seen]
    assert sorted(map(sorted, parities)) == [[0], [1]]  # one whole shard each, none shared
