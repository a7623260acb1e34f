"""CLIP-S / RefCLIP-S against a separate implementation of Hessel et al.'s formula, and --eval without references."""

import csv
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scripts.report  # noqa: F401  (bound to the real load_image: its thumbnails, at most 250, are not the decode pass)
from git_qlora_main import main
from utils import dataset_utils
from utils.clip_score import clip_s, compute_clip_scores, load_clip, ref_clip_s, try_load_clip


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 36, 3), dtype=np.uint8)) for i in range(count)]


def hessel_reference(model_dir: Path, images, candidates: list[str], references: list[list[str]]):
    """Per-image CLIP-S and RefCLIP-S from CLIPModel.forward's own embeddings, one image at a time, in numpy."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(model_dir).eval(), CLIPProcessor.from_pretrained(model_dir)
    clip_values, ref_values = [], []
    for image, candidate, refs in zip(images, candidates, references):
        texts = ["A photo depicts " + t for t in [candidate, *refs]]
        # clip.tokenize(..., truncate=True) in the reference code: at most 77 tokens, the last one EOS.
        inputs = processor(text=texts, images=[image], padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
        text = out.text_embeds.double().numpy()  # L2-normalised by the model's forward
        image_row = out.image_embeds.double().numpy()[0]
        c = 2.5 * max(float(image_row @ text[0]), 0.0)
        r = max(max(float(text[0] @ row) for row in text[1:]), 0.0)
        clip_values.append(c)
        ref_values.append(2 * c * r / (c + r) if c + r > 0 else 0.0)
    return np.array(clip_values), np.array(ref_values)


def test_formula_by_hand():
    image = np.array([[1.0, 0.0]])
    caption = np.array([[0.4, np.sqrt(1 - 0.16)]])
    assert clip_s(image, caption)[0] == pytest.approx(1.0)  # 2.5 * 0.4
    assert clip_s(image, -caption)[0] == 0.0  # negative cosine clamped
    assert ref_clip_s(np.array([1.0]), np.array([0.5]))[0] == pytest.approx(2 * 0.5 / 1.5)
    assert ref_clip_s(np.array([0.0]), np.array([-0.3]))[0] == 0.0  # no 0/0


def test_clip_scores_equal_a_separate_implementation(tiny_clip_dir):
    images = _images(5)
    candidates = ["a red circle", "two dogs on a sofa", "", "A photo of a very long caption " * 12, "café ☕ au lait"]
    references = [["a red ring", "a circle that is red", "red round thing"], ["dogs"], ["nothing here", "empty"],
                  ["long"], ["coffee with milk", "a cup"]]
    names = [f"{i}.png" for i in range(5)]
    embedder = load_clip(str(tiny_clip_dir))
    embeddings = dict(zip(names, embedder.embed_images(images[:2]).tolist() + embedder.embed_images(images[2:]).tolist()))
    embeddings = {name: np.array(row) for name, row in embeddings.items()}
    metrics, per_image = compute_clip_scores(embedder, embeddings, dict(zip(names, candidates)), dict(zip(names, references)))
    expected_clip, expected_ref = hessel_reference(tiny_clip_dir, images, candidates, references)
    assert [per_image["clip_score"][n] for n in names] == pytest.approx(expected_clip, abs=1e-5)
    assert [per_image["ref_clip_score"][n] for n in names] == pytest.approx(expected_ref, abs=1e-5)
    assert metrics["clip_score"] == pytest.approx(expected_clip.mean(), abs=1e-6)
    assert metrics["ref_clip_score"] == pytest.approx(expected_ref.mean(), abs=1e-6)
    assert (expected_clip > 0).any() and (expected_ref > 0).any()  # the comparison is not all zeros
    # Without references: CLIP-S alone, the same values.
    alone, _ = compute_clip_scores(embedder, embeddings, dict(zip(names, candidates)), {})
    assert alone["clip_score"] == pytest.approx(metrics["clip_score"]) and alone["ref_clip_score"] is None


def test_uncached_hub_id_fails_fast_once_with_a_note(caplog):
    start = time.perf_counter()
    embedder, note = try_load_clip("no-such-org/no-such-clip")  # HF_HUB_OFFLINE=1 in conftest
    again, note_again = try_load_clip("no-such-org/no-such-clip")
    assert embedder is None and again is None and time.perf_counter() - start < 15
    assert "--clip_model" in note and "other metrics are still valid" in note and note == note_again
    assert caplog.text.count("CLIP-S skipped") == 1
    assert try_load_clip(None)[1] == "CLIP-S disabled (--clip_model none)."


def _read_predictions(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["image_name"]: row["caption"] for row in csv.DictReader(handle)}


def test_eval_without_references_reads_each_image_once(tiny_model_dir, tiny_clip_dir, data_dir, tmp_path, monkeypatch):
    reads = Counter()
    original = dataset_utils.load_image

    def counting(path):
        reads[Path(path).name] += 1
        return original(path)

    monkeypatch.setattr(dataset_utils, "load_image", counting)
    out = tmp_path / "free"
    assert main(["--eval", "--model_name", str(tiny_model_dir), "--test_dir", str(data_dir / "test"),
                 "--captions_file", "none", "--clip_model", str(tiny_clip_dir), "--output_dir", str(out),
                 "--fgd_model", "none", "--num_workers", "0", "--max_new_tokens", "4", "--batch_size", "3"]) == 0
    assert len(reads) == 8 and set(reads.values()) == {1}  # captioning and CLIP shared one decode per image
    results = json.loads((out / "eval_results.json").read_text())
    assert results["bleu_4"] is None and results["cider"] is None and "references" in results["references_note"]
    assert results["num_images"] == 8 and results["clip_images"] == 8 and results["ref_clip_score"] is None
    assert results["caption_stats"]["num_captions"] == 8 and results["base_model"] is None
    predictions = _read_predictions(out / "eval_predictions.csv")
    names = sorted(predictions)
    images = [Image.open(data_dir / "test" / n).convert("RGB") for n in names]
    expected, _ = hessel_reference(tiny_clip_dir, images, [predictions[n] for n in names], [["x"]] * len(names))
    assert [results["per_image"]["clip_score"][n] for n in names] == pytest.approx(expected, abs=1e-5)
    assert results["clip_score"] == pytest.approx(expected.mean(), abs=1e-6)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'value="clip-asc"' in page and "data-clip=" in page and 'value="cider-asc"' not in page


def test_one_sentence_for_every_image_is_warned(tiny_clip_dir, data_dir, tmp_path, caplog):
    names = sorted(p.name for p in (data_dir / "test").glob("*.png"))
    preds = tmp_path / "same.csv"
    preds.write_text("image_name,caption\n" + "".join(f"test/{n},a red circle on the left\n" for n in names))
    out = tmp_path / "same"
    assert main(["--eval", "--predictions_file", str(preds), "--captions_file", str(data_dir / "captions.csv"),
                 "--test_dir", str(data_dir / "test"), "--clip_model", str(tiny_clip_dir), "--output_dir", str(out),
                 "--fgd_model", "none"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert f"{len(names)} of {len(names)} images" in results["collapse_warning"]
    assert "a red circle on the left" in results["collapse_warning"]
    assert results["caption_stats"]["num_distinct_captions"] == 1
    assert results["ref_clip_score"] is not None and results["clip_images"] == len(names)  # images from --test_dir
    assert "Possible mode collapse: 'a red circle on the left'" in caplog.text
    assert "Possible mode collapse" in (out / "report.html").read_text(encoding="utf-8")


def test_dataset_split_without_captions(tiny_model_dir, tiny_clip_dir, data_dir, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets.config.HF_DATASETS_CACHE = tmp_path / "hf_cache"
    names = sorted(p.name for p in (data_dir / "test").glob("*.png"))
    pq.write_table(pa.table({"jpg": [(data_dir / "test" / n).read_bytes() for n in names]}), tmp_path / "images.parquet")
    out = tmp_path / "ds"
    assert main(["--eval", "--model_name", str(tiny_model_dir), "--dataset", str(tmp_path / "images.parquet"),
                 "--eval_split", "train", "--clip_model", str(tiny_clip_dir), "--output_dir", str(out),
                 "--fgd_model", "none", "--num_workers", "0", "--max_new_tokens", "4"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["bleu_1"] is None and results["num_images"] == len(names) and results["clip_images"] == len(names)


def test_run_eval_compares_with_the_base_captions(trained_run, tiny_clip_dir, data_dir, tmp_path):
    import shutil

    run = tmp_path / "run_copy"
    shutil.copytree(trained_run, run)  # the session's run stays as other tests expect it
    assert main(["--eval", "--output_dir", str(run), "--test_dir", str(data_dir / "test"), "--captions_file", "none",
                 "--clip_model", str(tiny_clip_dir), "--fgd_model", "none", "--num_workers", "0",
                 "--max_new_tokens", "8"]) == 0
    results = json.loads((run / "eval_results.json").read_text())
    base = results["base_model"]
    assert base is not None and base["num_images"] == 8 and isinstance(base["clip_score"], float)
    assert base["caption_stats"]["num_captions"] == 8
    # The run trained on data/train's captions, which it can read again.
    assert results["caption_stats"]["copied_from_training"] is not None
    training = json.loads((run / "metrics.json").read_text())
    assert {"before", "after"} <= training.keys() and training["after"]["caption_stats"]["num_captions"] == 8
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "caption diversity" in page and "CLIP-S" in page
    assert page.count('<div class="base">base model: ') == 8 and "(CLIP-S " in page  # each row's base caption
    assert len(base["per_image"]["clip_score"]) == 8  # for a paired comparison of the two


def test_captions_file_none_is_for_eval_only(data_dir, tiny_model_dir, capsys):
    assert main(["--train", "--train_dir", str(data_dir / "train"), "--captions_file", "none",
                 "--model_name", str(tiny_model_dir)]) == 2
    assert "--captions_file none (no references) only applies to --eval" in capsys.readouterr().err


def test_an_unreadable_image_is_named_not_fatal(tiny_clip_dir, tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(_images(2)):
        image.save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    preds = tmp_path / "p.csv"
    preds.write_text("image_name,caption\n0.png,a dog\n1.png,a cat\nbroken.png,a bird\n")
    out = tmp_path / "out"
    assert main(["--eval", "--predictions_file", str(preds), "--captions_file", "none", "--test_dir", str(folder),
                 "--clip_model", str(tiny_clip_dir), "--output_dir", str(out), "--fgd_model", "none",
                 "--num_workers", "0"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["clip_images"] == 2 and "CLIP-S of 2 of the 3 captioned images" in results["clip_note"]
    assert results["caption_stats"]["num_captions"] == 3 and "broken.png" in caplog.text


def test_predictions_file_with_a_dataset_takes_its_images_and_captions(tiny_clip_dir, data_dir, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets.config.HF_DATASETS_CACHE = tmp_path / "hf_cache"
    names = sorted(p.name for p in (data_dir / "test").glob("*.png"))
    pq.write_table(pa.table({"file_name": names, "jpg": [(data_dir / "test" / n).read_bytes() for n in names],
                             "caption": [f"picture {n}" for n in names]}), tmp_path / "set.parquet")
    preds = tmp_path / "p.csv"
    preds.write_text("image_name,caption\n" + "".join(f"{n},a shape\n" for n in names[:5]))
    out = tmp_path / "out"
    assert main(["--eval", "--predictions_file", str(preds), "--dataset", str(tmp_path / "set.parquet"),
                 "--eval_split", "train", "--id_column", "file_name", "--clip_model", str(tiny_clip_dir),
                 "--output_dir", str(out), "--fgd_model", "none"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_images"] == 5 and results["clip_images"] == 5
    assert results["ref_clip_score"] is not None and len(results["per_image"]["ref_clip_score"]) == 5
