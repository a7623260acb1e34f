"""utils/caption_stats.py: distinct-n and the other statistics by hand, and the collapse warning."""

import pytest

from utils.caption_stats import caption_statistics, collapse_warning, distinct_n, format_caption_stats


def test_statistics_by_hand():
    captions = ["A dog runs.", "a dog runs", "a cat sleeps on a mat", "", "Two dogs!"]
    stats = caption_statistics(captions, training_captions=["a DOG runs", "a bird"])
    # Normalised: "a dog runs" (twice), "a cat sleeps on a mat", "", "two dogs".
    assert stats["num_captions"] == 5 and stats["num_distinct_captions"] == 4
    assert stats["distinct_caption_share"] == pytest.approx(4 / 5)
    # Unigrams: a dog runs | a dog runs | a cat sleeps on a mat | - | two dogs = 3 + 3 + 6 + 0 + 2 = 14 tokens;
    # distinct: a dog runs cat sleeps on mat two dogs = 9.
    assert stats["distinct_1"] == pytest.approx(9 / 14)
    # Bigrams: (a dog)(dog runs) x2, (a cat)(cat sleeps)(sleeps on)(on a)(a mat), (two dogs) = 10; distinct 8.
    assert stats["distinct_2"] == pytest.approx(8 / 10)
    assert stats["vocabulary_size"] == 9
    assert stats["mean_caption_length"] == pytest.approx(14 / 5)
    assert stats["copied_from_training"] == pytest.approx(2 / 5)  # both spellings of "a dog runs"
    assert stats["most_common_caption"] == "A dog runs." and stats["most_common_count"] == 2
    assert caption_statistics(captions)["copied_from_training"] is None


def test_distinct_n_edges():
    assert distinct_n([], 1) is None and distinct_n([["one"]], 2) is None
    assert distinct_n([["a", "a", "a"]], 1) == pytest.approx(1 / 3)
    assert distinct_n([["a", "b"], ["a", "b"]], 2) == pytest.approx(1 / 2)


def test_collapse_warning_names_the_caption_and_count():
    same = caption_statistics(["a red circle"] * 6 + ["a blue square", "a green star"])
    warning = collapse_warning(same)
    assert "'a red circle'" in warning and "6 of 8 images" in warning
    # Exactly a quarter is not more than a quarter; a single image is never "collapse".
    assert collapse_warning(caption_statistics(["x", "x", "a", "b", "c", "d", "e", "f"])) is None
    assert collapse_warning(caption_statistics(["x"])) is None
    assert "an empty caption" in collapse_warning(caption_statistics(["", "", "a"]))


def test_stats_table_before_after():
    table = format_caption_stats(caption_statistics(["a b", "a b"]), caption_statistics(["a b", "c d"]))
    lines = table.splitlines()
    assert lines[0].split() == ["caption", "statistic", "before", "after"]
    assert any(line.split()[:3] == ["num_distinct_captions", "1", "2"] for line in lines)
    assert "copied_from_training" not in table  # not computed: not shown
