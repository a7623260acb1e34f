"""The official COCO protocol: PTBTokenizer and METEOR against pycocoevalcap's COCOEvalCap, the Java wrapper's
failure modes, and the bootstrap intervals against pycocoevalcap on resampled sets.

Tests that need Java fail (not skip) under CI, where .ci/run installs default-jre-headless.
"""

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from git_qlora_main import main
from utils import java_scorers
from utils.confidence import CorpusStats, bootstrap_intervals, paired_change_intervals, resample_counts
from utils.errors import UserInputError
from utils.evaluation import compute_caption_metrics, evaluate_captions, format_metrics_table
from utils.java_scorers import (
    JavaError, compute_meteor, meteor_from_stats, meteor_summable, ptb_tokenize, resolve_caption_tokenizer,
)

# Capitals, punctuation PTB splits off or keeps ('s, n't, -lrb-), quotes, numbers, 1 to 5 references.
PREDICTIONS = {
    1: "A man's red-dog, running on the GRASS!",
    2: "two cats (sleeping) on a sofa.",
    3: "A plate of food... with a fork",
    4: "The dog doesn't like the \"bath\" at 3:30",
    5: "a man riding a horse on a beach",
    6: "Children playing soccer in a park",
    7: "a red double-decker bus on a city street",
    8: "a kitchen with a stove and a sink",
}
REFERENCES = {
    1: ["A man's red dog runs across the grass.", "A dog running on grass", "The red dog is running!"],
    2: ["Two cats are asleep on a couch.", "Cats sleeping on the sofa", "two cats lying on a red sofa"],
    3: ["A plate of food with a fork and knife.", "Dinner on a white plate"],
    4: ["A dog that doesn't want a bath.", "The dog is in the bathtub", "a wet dog in a tub", "dog bath time",
        "A dog being given a bath"],
    5: ["A person rides a horse along the beach.", "a man on horseback by the sea"],
    6: ["Kids play football in the park.", "children kicking a soccer ball on grass", "a soccer game in a park"],
    7: ["A red bus driving down a street.", "a double decker bus in the city"],
    8: ["A kitchen with a stove, a sink and cabinets.", "an empty kitchen", "a small kitchen with white appliances"],
}


@pytest.fixture(scope="session")
def java() -> str:
    path = java_scorers.find_java("java")
    if path is None or java_scorers.check_java("java") is not None:
        message = f"Java is needed for the PTBTokenizer and METEOR ({java_scorers.INSTALL_JAVA})"
        if os.environ.get("CI"):  # .ci/run installs it: missing in CI is a broken setup
            pytest.fail(message)
        pytest.skip(message)
    return "java"


class _FakeCOCO:
    """What COCOEvalCap reads from a COCO object: getImgIds() and imgToAnns."""

    def __init__(self, captions: dict):
        self.imgToAnns = {k: [{"image_id": k, "caption": c} for c in (v if isinstance(v, list) else [v])]
                          for k, v in captions.items()}

    def getImgIds(self):
        return list(self.imgToAnns)


class _NoSpice:
    """Stands in for Spice, which needs CoreNLP 3.6.0 models downloaded from outside."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


def test_ptb_protocol_equals_cocoevalcap(java, monkeypatch):
    import pycocoevalcap.eval as coco_eval

    monkeypatch.setattr(coco_eval, "Spice", _NoSpice)
    evaluator = coco_eval.COCOEvalCap(_FakeCOCO(REFERENCES), _FakeCOCO(PREDICTIONS))
    evaluator.evaluate()
    expected = evaluator.eval

    scores = evaluate_captions({str(k): v for k, v in PREDICTIONS.items()}, {str(k): v for k, v in REFERENCES.items()},
                               fgd_model=None, caption_tokenizer="ptb", java=java, resamples=0)
    metrics = scores.metrics
    assert metrics["caption_tokenizer"] == "ptb"
    for ours, theirs in (("bleu_1", "Bleu_1"), ("bleu_2", "Bleu_2"), ("bleu_3", "Bleu_3"), ("bleu_4", "Bleu_4"),
                         ("rouge_l", "ROUGE_L"), ("cider", "CIDEr")):
        assert metrics[ours] == pytest.approx(expected[theirs], abs=1e-6), ours
    assert metrics["meteor"] == pytest.approx(expected["METEOR"], abs=1e-4)
    assert metrics["meteor_note"] is None
    for image, per in evaluator.imgToEval.items():
        assert scores.per_image[str(image)]["meteor"] == pytest.approx(per["METEOR"], abs=1e-4)
        assert scores.per_image[str(image)]["cider"] == pytest.approx(per["CIDEr"], abs=1e-6)
    assert metrics["spice"] is None and "CoreNLP 3.6.0" in metrics["spice_note"]
    # The simple protocol gives other numbers on the same text: they are never the same protocol.
    simple = compute_caption_metrics({str(k): v for k, v in PREDICTIONS.items()},
                                     {str(k): v for k, v in REFERENCES.items()}, caption_tokenizer="simple")
    assert simple["cider"] != pytest.approx(metrics["cider"], abs=1e-3)


def test_ptb_tokenizer_keeps_lines_aligned_on_hostile_text(java):
    long_caption = "a very long caption " * 100  # 2,000 characters
    odd = ["A man's dog.", "line\nbreak", "carriage\rreturn", "para\u2029sep", "", "   ", "😀", "Café naïve über",
           "pipes ||| in text", 'say "hi" (now)', long_caption, "tab\tand\fform", "emoji 🐶 dog"]
    texts = [t for i, text in enumerate(odd) for t in (text, f"marker{i}")]
    tokens = ptb_tokenize(texts, java)
    assert tokens[1::2] == [f"marker{i}" for i in range(len(odd))]  # every caption kept its own line
    got = dict(zip(odd, tokens[0::2]))
    assert got["A man's dog."] == "a man 's dog"
    assert got["line\nbreak"] == "line break" and got["carriage\rreturn"] == "carriage return"
    assert got["para\u2029sep"] == "para sep" and got[""] == "" and got["   "] == "" and got["😀"] == ""
    assert got["Café naïve über"] == "café naïve über"  # UTF-8 both ways
    assert got['say "hi" (now)'] == "say hi -lrb- now -rrb-"  # pycocoevalcap's list has only upper-case -LRB-
    assert got[long_caption].split() == long_caption.split() and got["emoji 🐶 dog"] == "emoji dog"


def test_meteor_wrapper_matches_its_own_aggregation_on_hostile_text(java):
    hypotheses = ["a man riding a horse", "", "pipes ||| inside", "line\nbreak dog", "café 😀 naïve",
                  "word " * 400, 'a "quoted" cat']
    references = [["a man is riding a horse", "a person on a horse"], ["a red car"], ["pipes inside", "|||"],
                  ["a dog", "line break"], ["café naïve"], ["word word"], ['a "quoted" cat sits']]
    result = compute_meteor(hypotheses, references, java)
    assert len(result.segment_scores) == len(hypotheses) and result.stats.shape == (len(hypotheses), 23)
    assert result.segment_scores[1] == 0.0 and result.segment_scores[0] > 0.4
    # METEOR's EVAL, redone in numpy: per segment and for the corpus (summed statistics).
    np.testing.assert_allclose(meteor_from_stats(result.stats), result.segment_scores, atol=1e-12)
    assert float(meteor_from_stats(meteor_summable(result.stats).sum(axis=0))) == pytest.approx(result.score, abs=1e-12)


def test_meteor_process_is_kept_for_later_calls_and_replaced_when_it_dies(java):
    """One METEOR start serves every scoring of a job; a process that died between calls is replaced, and each
    answer equals a fresh process's (pycocoevalcap's own Meteor wrapper, one process per call)."""
    from pycocoevalcap.meteor.meteor import Meteor

    java_scorers.stop_meteor()
    first_h, first_r = ["a man riding a horse", "two dogs"], [["a man is riding a horse"], ["two dogs play", "dogs"]]
    later_h, later_r = ["a red bus on a street", "a cat"], [["a red bus driving down a street"], ["a cat sleeping"]]
    java_scorers.start_meteor(java)  # returns at once; the table loads in the background
    path = java_scorers.find_java(java)
    pid = java_scorers._METEOR_PROCESSES[path].process.pid
    first = compute_meteor(first_h, first_r, java)
    later = compute_meteor(later_h, later_r, java)
    assert java_scorers._METEOR_PROCESSES[path].process.pid == pid  # the same process answered both

    reference = Meteor()
    try:
        expected, _ = reference.compute_score({i: r for i, r in enumerate(later_r)}, {i: [h] for i, h in enumerate(later_h)})
    finally:
        with reference.lock:
            reference.meteor_p.kill()
            reference.meteor_p.wait()
    assert later.score == pytest.approx(expected, abs=1e-4)

    os.kill(pid, 9)  # e.g. the OOM killer, while nothing was asked
    java_scorers._METEOR_PROCESSES[path].process.wait()
    again = compute_meteor(first_h, first_r, java)
    assert java_scorers._METEOR_PROCESSES[path].process.pid != pid
    assert again.score == pytest.approx(first.score, abs=1e-12) and again.segment_scores == first.segment_scores
    java_scorers.stop_meteor()
    assert not java_scorers._METEOR_PROCESSES


def _fake_java(tmp_path: Path, body: str) -> str:
    script = tmp_path / "java"
    script.write_text('#!/bin/sh\nif [ "$1" = "-version" ]; then exit 0; fi\n' + body)
    script.chmod(0o755)
    java_scorers.check_java.cache_clear()
    return str(script)


def test_java_dying_mid_run_gives_a_note_and_the_other_metrics(tmp_path):
    java = _fake_java(tmp_path, 'read line\necho "Exception: out of memory" >&2\nexit 3\n')
    start = time.monotonic()
    scores = evaluate_captions({"a": "a dog", "b": "a cat"}, {"a": ["a dog runs"], "b": ["a cat"]}, fgd_model=None,
                               caption_tokenizer="simple", java=java, resamples=50)
    metrics = scores.metrics
    assert time.monotonic() - start < 30
    assert metrics["meteor"] is None and "exit code 3" in metrics["meteor_note"]
    assert "out of memory" in metrics["meteor_note"] and "other metrics are still valid" in metrics["meteor_note"]
    assert metrics["bleu_1"] > 0.5 and metrics["cider"] >= 0 and "meteor" not in metrics["confidence"]


def test_hanging_java_is_stopped_at_the_timeout(tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    java = _fake_java(tmp_path, f'echo $$ > {pid_file}\nexec sleep 600\n')
    monkeypatch.setattr(java_scorers, "METEOR_TIMEOUT_S", 2)
    start = time.monotonic()
    with pytest.raises(JavaError, match="no answer within 2 s"):
        compute_meteor(["a dog"], [["a dog"]], java)
    assert time.monotonic() - start < 15
    pid = int(pid_file.read_text())
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left behind
        os.kill(pid, 0)
    assert java_scorers.find_java(java) not in java_scorers._METEOR_PROCESSES  # the next call starts afresh


def test_auto_falls_back_to_simple_with_one_warning(tmp_path, caplog):
    java_scorers._warn_no_java.cache_clear()
    missing = str(tmp_path / "no" / "java")
    with caplog.at_level(logging.WARNING):
        assert resolve_caption_tokenizer("auto", missing) == "simple"
        assert resolve_caption_tokenizer("auto", missing) == "simple"
    warnings = [r.getMessage() for r in caplog.records if "apt-get install default-jre-headless" in r.getMessage()]
    assert len(warnings) == 1 and "simple" in warnings[0]
    assert resolve_caption_tokenizer("simple", missing) == "simple"
    with pytest.raises(UserInputError, match="--caption_tokenizer ptb"):
        resolve_caption_tokenizer("ptb", missing)
    metrics = evaluate_captions({"a": "a dog"}, {"a": ["a dog"]}, fgd_model=None, java=missing, resamples=0).metrics
    assert metrics["caption_tokenizer"] == "simple" and metrics["meteor"] is None
    assert "default-jre-headless" in metrics["meteor_note"] and metrics["bleu_1"] == pytest.approx(1.0)


def test_ptb_without_java_is_a_flag_error_in_seconds(tmp_path, capsys):
    refs = tmp_path / "refs.csv"
    refs.write_text("image_name,caption\na.jpg,a dog\n", encoding="utf-8")
    start = time.monotonic()
    code = main(["--eval", "--predictions_file", str(refs), "--captions_file", str(refs), "--output_dir",
                 str(tmp_path / "out"), "--fgd_model", "none", "--caption_tokenizer", "ptb", "--java", str(tmp_path / "nope")])
    assert code == 2 and time.monotonic() - start < 20
    assert "--caption_tokenizer ptb" in capsys.readouterr().err and not (tmp_path / "out" / "eval_results.json").exists()
    assert main(["--eval", "--predictions_file", str(refs), "--captions_file", str(refs), "--output_dir",
                 str(tmp_path / "out"), "--caption_tokenizer", "ptb", "--java", "none"]) == 2
    assert main(["--eval", "--predictions_file", str(refs), "--captions_file", str(refs), "--caption_tokenizer", "bpe"]) == 2


def test_wordpiece_decode_scores_lower_under_ptb_only(java):
    references = {"a": ["a man's red-dog on a skate-board."], "b": ["the dog's ball isn't red."]}
    tidy = {"a": "a man's red-dog on a skate-board.", "b": "the dog's ball isn't red."}
    raw = {"a": "a man ' s red - dog on a skate - board .", "b": "the dog ' s ball isn ' t red ."}
    simple = [compute_caption_metrics(p, references, caption_tokenizer="simple") for p in (tidy, raw)]
    ptb = [compute_caption_metrics(p, references, caption_tokenizer="ptb", java=java) for p in (tidy, raw)]
    assert simple[0]["bleu_4"] == pytest.approx(simple[1]["bleu_4"]) == pytest.approx(1.0)
    assert ptb[0]["bleu_4"] == pytest.approx(1.0) and ptb[1]["bleu_4"] < 0.5


def test_eval_cli_writes_protocol_meteor_intervals_and_report_column(java, tmp_path, capsys):
    refs, preds = tmp_path / "refs.csv", tmp_path / "preds.csv"
    refs.write_text("image_name,caption\n" + "".join(f'{k}.jpg,"{c}"\n' for k, v in REFERENCES.items() for c in
                                                      (x.replace('"', '""') for x in v)), encoding="utf-8")
    preds.write_text("image_name,caption\n" + "".join(f'{k}.jpg,"{v.replace(chr(34), chr(34) * 2)}"\n'
                                                      for k, v in PREDICTIONS.items()), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["--eval", "--predictions_file", str(preds), "--captions_file", str(refs), "--output_dir", str(out),
                 "--fgd_model", "none"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "eval_results.json").read_text())
    assert results["settings"]["caption_tokenizer"] == results["caption_tokenizer"] == "ptb"
    assert 0 < results["meteor"] < 1 and results["spice"] is None
    for key in ("bleu_4", "meteor", "rouge_l", "cider"):
        interval = results["confidence"][key]
        assert interval["low"] <= results[key] <= interval["high"]
        assert interval["level"] == 0.95 and interval["resamples"] == 1000
        assert f"{results[key]:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]" in printed
    assert "protocol: ptb" in printed
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Scoring protocol: ptb" in page and page.count("data-meteor=") == len(PREDICTIONS)
    assert 'value="meteor-asc"' in page and "<th>METEOR</th>" in page and 'class="ci"' in page


def test_training_validates_with_the_resolved_protocol(java, tmp_path, train_cmd):
    args = train_cmd(tmp_path, "ptb", "--max_steps", "2", "--eval_steps", "2", "--learning_rate", "2e-2",
                     "--metric_for_best_model", "meteor", "--java", java)
    assert main(args) == 0
    run = tmp_path / "ptb"
    assert json.loads((run / "run_config.json").read_text())["caption_tokenizer"] == "ptb"  # auto, resolved once
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["caption_tokenizer"] == "ptb"
    for side in ("before", "after"):
        assert metrics[side]["caption_tokenizer"] == "ptb" and 0 <= metrics[side]["meteor"] <= 1
        assert set(metrics[side]["confidence"]) == {"bleu_4", "meteor", "rouge_l", "cider"}
    for key, change in metrics["change"].items():
        assert change["value"] == pytest.approx(metrics["after"][key] - metrics["before"][key], abs=1e-9), key
        assert change["low"] <= change["high"] and change["significant"] == (change["low"] > 0 or change["high"] < 0)
    state = json.loads(next((run / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    evals = [e for e in state["log_history"] if "eval_meteor" in e]
    assert evals and state["best_metric"] == pytest.approx(evals[-1]["eval_meteor"])
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Scoring protocol: ptb" in page and "data-meteor=" in page


# ---------------------------------------------------------------------------
# Bootstrap intervals (no Java)
# ---------------------------------------------------------------------------


def _corpus(n: int, seed: int, good: float):
    """n images with 3 references each; a share `good` of the predictions copy a reference."""
    rng = np.random.default_rng(seed)
    words = "a the man woman dog cat red blue sits runs on in with near table street ball bike car tree".split()
    def sentence():
        return " ".join(rng.choice(words, size=rng.integers(4, 10)))
    refs = [[sentence() for _ in range(3)] for _ in range(n)]
    hyps = [r[0] if rng.random() < good else sentence() for r in refs]
    return hyps, refs


def test_bootstrap_statistic_on_the_identity_and_a_resample_equals_pycocoevalcap():
    hyps, refs = _corpus(40, 0, 0.3)
    stats = CorpusStats.build(hyps, refs)
    gts, res = {i: refs[i] for i in range(40)}, {i: [hyps[i]] for i in range(40)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    identity = stats.metrics(np.ones((1, 40)))
    assert identity["bleu_4"][0] == pytest.approx(bleu[3], abs=1e-12)
    assert identity["cider"][0] == pytest.approx(cider, abs=1e-12)
    # A real resample, duplicates and all: pycocoevalcap on the resampled set (CIDEr-D recounts its document
    # frequencies over it, BLEU pools the copies' counts).
    counts = resample_counts(40, 2, seed=7)[1]
    drawn = [i for i in range(40) for _ in range(int(counts[i]))]
    gts2, res2 = {k: refs[i] for k, i in enumerate(drawn)}, {k: [hyps[i]] for k, i in enumerate(drawn)}
    bleu2, _ = Bleu(4).compute_score(gts2, res2, verbose=0)
    cider2, _ = Cider().compute_score(gts2, res2)
    resampled = stats.metrics(counts[None])
    assert resampled["bleu_4"][0] == pytest.approx(bleu2[3], abs=1e-12)
    assert resampled["cider"][0] == pytest.approx(cider2, abs=1e-12)
    assert cider2 != pytest.approx(cider, abs=1e-3)  # the resample is not the identity


def test_intervals_contain_the_estimate_and_are_seeded():
    hyps, refs = _corpus(60, 1, 0.4)
    stats = CorpusStats.build(hyps, refs, means={"clip_score": np.linspace(0.5, 0.9, 60)})
    point = {k: v[0] for k, v in stats.metrics(np.ones((1, 60))).items()}
    first = bootstrap_intervals(stats, seed=3)
    assert set(first) == {"bleu_4", "cider", "clip_score"}
    for key, interval in first.items():
        assert interval["low"] <= point[key] <= interval["high"] and interval["low"] < interval["high"], key
        assert interval["level"] == 0.95 and interval["resamples"] == 1000
    assert bootstrap_intervals(stats, seed=3) == first
    assert bootstrap_intervals(stats, seed=4)["cider"] != first["cider"]


def test_paired_change_of_a_real_improvement_excludes_zero_and_of_the_same_captions_is_zero():
    hyps, refs = _corpus(80, 2, 0.1)
    better = [r[0] if i % 2 == 0 else h for i, (h, r) in enumerate(zip(hyps, refs))]  # half copy a reference
    before, after = CorpusStats.build(hyps, refs), CorpusStats.build(better, refs)
    change = paired_change_intervals(before, after, seed=0)
    for key in ("bleu_4", "cider"):
        assert change[key]["significant"] and change[key]["low"] > 0, key
        assert change[key]["low"] <= change[key]["value"] <= change[key]["high"]
    same = paired_change_intervals(before, CorpusStats.build(hyps, refs), seed=0)
    for key, interval in same.items():
        assert (interval["value"], interval["low"], interval["high"], interval["significant"]) == (0, 0, 0, False)


def test_table_shows_intervals_and_significant_changes():
    before = {"cider": 0.5, "caption_tokenizer": "ptb", "confidence": {"cider": {"low": 0.4, "high": 0.6, "level": 0.95,
                                                                                   "resamples": 1000}}}
    after = {"cider": 0.861, "caption_tokenizer": "ptb", "confidence": {"cider": {"low": 0.83, "high": 0.89, "level": 0.95,
                                                                                    "resamples": 1000}}}
    change = {"cider": {"value": 0.361, "low": 0.2, "high": 0.5, "level": 0.95, "resamples": 1000, "significant": True}}
    single = format_metrics_table(after)
    assert "0.8610 [0.8300, 0.8900]" in single and "protocol: ptb" in single and "1000 resamples" in single
    both = format_metrics_table(before, after, change)
    assert "+0.3610 [+0.2000, +0.5000] *" in both
    mixed = format_metrics_table(before, {**after, "caption_tokenizer": "simple"})
    assert "not comparable" in mixed
