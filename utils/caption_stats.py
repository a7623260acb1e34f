"""Diversity and collapse of a set of captions: distinct captions, distinct-n, vocabulary, length, training copies.

Pure functions of strings. Words are the metrics' normalised words (utils/text.normalize_caption, or the
normalisation passed in), so "A dog." and "a dog" are one caption, as they are one caption to BLEU or CIDEr-D.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

from utils.text import normalize_caption

# One caption given to more than this share of the images is a collapse warning (and at least twice).
COLLAPSE_SHARE = 0.25
STAT_KEYS = ("num_captions", "num_distinct_captions", "distinct_caption_share", "distinct_1", "distinct_2",
             "vocabulary_size", "mean_caption_length", "copied_from_training")


def distinct_n(token_lists: list[list[str]], n: int) -> float | None:
    """Unique n-grams / all n-grams over the whole set (Li et al. 2016's distinct-n); None when there is no n-gram."""
    grams = [tuple(tokens[i:i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def caption_statistics(captions: Iterable[str], training_captions: Iterable[str] | None = None,
                       normalize: Callable[[str], str] = normalize_caption) -> dict:
    """Counts, shares and the most common caption of one caption per image (see STAT_KEYS).

    copied_from_training is the share of captions equal (after normalisation) to one of training_captions;
    None when they are not given. most_common_caption is the first spelling seen of the most frequent caption.
    """
    captions = list(captions)
    normalised = [normalize(text) for text in captions]
    tokens = [text.split() for text in normalised]
    counts = Counter(normalised)
    top, top_count = counts.most_common(1)[0] if counts else ("", 0)
    copied = None
    if training_captions is not None:
        seen = {normalize(text) for text in training_captions}
        copied = sum(text in seen for text in normalised) / len(normalised) if normalised else None
    return {
        "num_captions": len(captions),
        "num_distinct_captions": len(counts),
        "distinct_caption_share": len(counts) / len(captions) if captions else None,
        "distinct_1": distinct_n(tokens, 1),
        "distinct_2": distinct_n(tokens, 2),
        "vocabulary_size": len({word for words in tokens for word in words}),
        "mean_caption_length": sum(map(len, tokens)) / len(tokens) if tokens else None,
        "copied_from_training": copied,
        "most_common_caption": captions[normalised.index(top)] if counts else None,
        "most_common_count": top_count,
    }


def collapse_warning(stats: dict, share: float = COLLAPSE_SHARE) -> str | None:
    """A sentence naming the caption given to more than `share` of the images (and to two or more), else None."""
    count, total = stats.get("most_common_count") or 0, stats.get("num_captions") or 0
    if count < 2 or count <= share * total:
        return None
    caption = stats.get("most_common_caption")
    shown = repr(caption) if caption and caption.strip() else "an empty caption"
    return (f"Possible mode collapse: {shown} is the caption of {count} of {total} images ({100 * count / total:.0f}%, "
            f"more than {100 * share:.0f}%); {stats.get('num_distinct_captions')} distinct captions in all. "
            "A model that says one sentence for everything can still score a plausible BLEU on similar images.")


def format_caption_stats(stats: dict, other: dict | None = None, labels: tuple[str, str] = ("before", "after")) -> str:
    """Aligned text table of the statistics; with `other`, two columns named by labels (stats, then other)."""
    def cell(value) -> str:
        if value is None:
            return "n/a"
        return str(value) if isinstance(value, int) else f"{value:.4f}"

    columns = [stats] if other is None else [stats, other]
    rows = [("caption statistic", *(("value",) if other is None else labels))]
    rows += [(key, *(cell(c.get(key)) for c in columns)) for key in STAT_KEYS
             if any(c.get(key) is not None for c in columns)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
