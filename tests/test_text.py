"""Caption text with GIT's real WordPiece vocabulary: tidy captions for people, one normalisation for metrics."""

import csv
import json
from pathlib import Path

import pytest

from git_qlora_main import main
from models.small_git import PretrainSettings, build_small_git, pretrain_small_git
from utils.evaluation import compute_caption_metrics
from utils.text import normalize_caption, tidy_caption

from conftest import TINY_SIZE

# Possessives, hyphens, commas, semicolons, colons, numbers, brackets, quotes, contractions.
SENTENCES = [
    "a man's red-dog, on a skate-board.",
    "two dogs; one cat: 3:30 pm, 1,000 people (maybe) don't go!",
    "the kids' toys and a 3.5 inch \"sign\" at 10 o'clock",
    "a sign that says 'stop' next to a woman's bike",
    "a $5 bill and a #1 fan, they're at a 1950s-style diner.",
    "a black-and-white photo of the dog's bone: 2 cats, 3 birds",
]

# The caption the WordPiece test model is taught to say for every picture.
TAUGHT = "a man's red-dog, on a skate-board."


def _round_trip(tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True)


def test_decoding_really_splits_punctuation(bert_tokenizer):
    # The premise of this file, as transformers 5 behaves: if decode ever rejoins, the tests below prove less.
    assert _round_trip(bert_tokenizer, SENTENCES[0]) == "a man ' s red - dog, on a skate - board."


@pytest.mark.parametrize("sentence", SENTENCES)
def test_tidy_caption_restores_what_wordpiece_split(bert_tokenizer, sentence):
    decoded = _round_trip(bert_tokenizer, sentence)
    assert tidy_caption(decoded) == sentence
    assert tidy_caption(sentence) == sentence  # tidy text stays as it is
    assert normalize_caption(tidy_caption(decoded)) == normalize_caption(decoded)  # words never change


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a man ' s red - dog , on a skate - board .", "a man's red-dog, on a skate-board."),
        ("  spaces   collapse  ", "spaces collapse"),
        ("a sign says ' hello world '", "a sign says 'hello world'"),
        ("the dogs ' ball", "the dogs' ball"),
        ("a 3 . 5 inch screen at 3 : 30", "a 3.5 inch screen at 3:30"),
        ("", ""),
    ],
)
def test_tidy_caption_cases(text, expected):
    assert tidy_caption(text) == expected


def test_wordpiece_round_trip_scores_one(bert_tokenizer):
    references = {f"img{i}": [s] for i, s in enumerate(SENTENCES)}
    predictions = {name: _round_trip(bert_tokenizer, refs[0]) for name, refs in references.items()}
    # Today's normalisation, pinned: under ptb a raw WordPiece decode scores lower (see test_protocol.py).
    spaced = compute_caption_metrics(predictions, references, caption_tokenizer="simple")
    exact = compute_caption_metrics({name: refs[0] for name, refs in references.items()}, references, caption_tokenizer="simple")
    for key in ("bleu_1", "bleu_4", "rouge_l", "rouge_1", "rouge_2"):
        assert spaced[key] == pytest.approx(1.0), key
    assert spaced["cider"] == pytest.approx(exact["cider"]) and spaced["cider"] > 1.0


def test_eval_predictions_file_of_wordpiece_text_scores_one(bert_tokenizer, tmp_path):
    refs, preds = tmp_path / "refs.csv", tmp_path / "preds.csv"
    with open(refs, "w", newline="", encoding="utf-8") as r, open(preds, "w", newline="", encoding="utf-8") as p:
        r_writer, p_writer = csv.writer(r), csv.writer(p)
        r_writer.writerow(["image_name", "caption"])
        p_writer.writerow(["image_name", "caption"])
        for i, sentence in enumerate(SENTENCES[:3]):
            r_writer.writerow([f"{i}.jpg", sentence])
            p_writer.writerow([f"{i}.jpg", _round_trip(bert_tokenizer, sentence)])
    assert main(["--eval", "--predictions_file", str(preds), "--captions_file", str(refs),
                 "--output_dir", str(tmp_path / "out"), "--fgd_model", "none", "--caption_tokenizer", "simple",
                 "--java", "none"]) == 0
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["bleu_4"] == pytest.approx(1.0) and results["rouge_l"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def wordpiece_git(tmp_path_factory, bert_vocab_file, data_dir) -> Path:
    """A tiny GIT with bert-base-uncased's vocabulary, taught to say TAUGHT for every picture."""
    from utils.dataset_utils import find_images, load_image

    folder = build_small_git(tmp_path_factory.mktemp("wordpiece_git"), [], TINY_SIZE, seed=0, vocab_file=bert_vocab_file)
    images = [load_image(data_dir / "train" / name)[0] for name in find_images(data_dir / "train")[:8]]
    settings = PretrainSettings(steps=120, batch_size=8, learning_rate=3e-3, warmup_steps=10, max_length=24,
                                sincos_positions=False)
    stats = pretrain_small_git(folder, [(image, TAUGHT) for image in images], settings)
    assert stats["final_loss"] < 0.05, stats  # it has learned the sentence
    return folder


def test_captions_csv_and_stdout_read_like_text(wordpiece_git, data_dir, tmp_path, capsys):
    out = tmp_path / "base"
    assert main(["--inference", "--model_name", str(wordpiece_git), "--quantization_bits", "32", "--test_dir",
                 str(data_dir / "test"), "--output_dir", str(out), "--num_workers", "0"]) == 0
    with open(out / "captions.csv", newline="", encoding="utf-8") as handle:
        captions = [row[1] for row in list(csv.reader(handle))[1:]]
    assert captions and all(caption == TAUGHT for caption in captions)
    capsys.readouterr()
    image = str(data_dir / "test" / "img_00000.png")
    assert main(["--inference", "--model_name", str(wordpiece_git), "--quantization_bits", "32",
                 "--test_image", image, "--output_dir", str(out)]) == 0
    assert capsys.readouterr().out == TAUGHT + "\n"
