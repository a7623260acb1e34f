"""A feature cache that proves itself: wrong sizes and bad meta rebuild it, rows failing their checksum are encoded again."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from git_qlora_main import main
from utils.feature_store import FeatureStore

SHAPE = (5, 8)


def filled_store(folder, rows=6, dtype=torch.float32):
    keys = [f"k{i}" for i in range(rows)]
    store = FeatureStore(folder, keys, SHAPE, dtype, "src")
    values = torch.arange(rows * 40, dtype=torch.float32).reshape(rows, *SHAPE) + 1
    store.write(keys, values)
    del store
    return keys, values


def reopen(folder, keys, dtype=torch.float32):
    return FeatureStore(folder, keys, SHAPE, dtype, "src")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_intact_store_is_reused_whole(tmp_path, dtype):
    keys, values = filled_store(tmp_path / "c", dtype=dtype)
    store = reopen(tmp_path / "c", keys, dtype)
    assert (store.rebuilt, store.reused, store.refilled, store.missing()) == (None, 6, 0, [])
    assert torch.equal(store.read("k3").float(), values[3].to(dtype).float())


def test_zeroed_and_torn_rows_are_refilled(tmp_path):
    keys, _ = filled_store(tmp_path / "c")
    rows = np.memmap(tmp_path / "c" / "features.bin", dtype=np.float32, mode="r+", shape=(6, *SHAPE))
    rows[1] = 0  # zeroed, as a file grown back after truncation
    rows[4, 2, 3] += 1e-3  # one value torn
    rows.flush()
    del rows
    store = reopen(tmp_path / "c", keys)
    assert store.rebuilt is None and store.refilled == 2 and store.reused == 4
    assert store.missing() == ["k1", "k4"]
    reopened = reopen(tmp_path / "c", keys)  # the unmarking is on disk
    assert reopened.missing() == ["k1", "k4"] and reopened.refilled == 0


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "features.bin").write_bytes((d / "features.bin").read_bytes()[:500]), "features.bin is 500 bytes where meta.json implies 960"),
    (lambda d: (d / "checksums.bin").unlink(), "checksums.bin is missing"),
    (lambda d: (d / "meta.json").write_text("{broken"), "its meta.json cannot be read"),
    (lambda d: (d / "filled.bin").write_bytes(b"\x01" * 7), "filled.bin is 7 bytes"),
])
def test_untrustworthy_store_is_rebuilt_never_read(tmp_path, damage, reason):
    keys, _ = filled_store(tmp_path / "c")
    damage(tmp_path / "c")
    store = reopen(tmp_path / "c", keys)
    assert reason in store.rebuilt and store.reused == 0 and store.missing() == keys
    assert (tmp_path / "c" / "features.bin").stat().st_size == 6 * 40 * 4


# ---------------------------------------------------------------------------
# Through --train --resume
# ---------------------------------------------------------------------------


@pytest.fixture
def kept_cache(monkeypatch):
    """Training removes its cache at the end; these tests keep it, as a run killed after filling it would."""
    monkeypatch.setattr(FeatureStore, "remove", lambda self: None)


def cache_files(run):
    folder = run / "feature_cache" / "node-0"
    meta = json.loads((folder / "meta.json").read_text())
    storage = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}[meta["dtype"]]
    return folder, storage, (meta["rows"], *meta["row_shape"])


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_resume_refills_a_damaged_cache_to_what_a_fresh_fill_gives(tmp_path, train_cmd, kept_cache, caplog, damage):
    argv = train_cmd(tmp_path, "r", "--cache_image_features", "on", "--bnb_4bit_compute_dtype", "float32")
    assert main(argv + ["--max_steps", "2", "--eval_steps", "2"]) == 0
    run = tmp_path / "r"
    folder, storage, shape = cache_files(run)
    fresh = np.fromfile(folder / "features.bin", dtype=storage).reshape(shape).copy()
    assert np.count_nonzero(np.abs(fresh).reshape(shape[0], -1).sum(1) == 0) == 0
    shutil.rmtree(run / "final_model")  # as if killed while training on the filled cache
    if damage == "truncate":
        with open(folder / "features.bin", "r+b") as f:
            f.truncate(fresh.nbytes // 3)
    else:
        rows = np.memmap(folder / "features.bin", dtype=storage, mode="r+", shape=shape)
        rows[5:12] = 0
        rows.flush()
        del rows
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(argv + ["--max_steps", "3", "--eval_steps", "3", "--resume"]) == 0
    after = np.fromfile(folder / "features.bin", dtype=storage).reshape(shape)
    assert np.array_equal(after, fresh)  # what training read: refilled rows equal a fresh fill, no zeros
    if damage == "truncate":
        assert "cannot be trusted (features.bin is" in caplog.text and "it is rebuilt from the images" in caplog.text
        assert f"reuses 0 of {shape[0]} rows" in caplog.text
    else:
        assert "7 row(s) did not match their checksum" in caplog.text
        assert f"reuses {shape[0] - 7} of {shape[0]} rows; 7 to encode" in caplog.text
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 3
