"""95% bootstrap intervals over images for the corpus caption metrics, and paired intervals of a change.

A resample draws the evaluated images with replacement and recomputes each corpus metric as pycocoevalcap would on
that set: BLEU-4 from the resampled sufficient statistics (clipped n-gram counts, hypothesis and closest-reference
lengths), CIDEr-D with its document frequencies recounted over the resample, METEOR from its summed per-segment
statistics (the aggregation of METEOR's own EVAL), ROUGE-L and other per-image means as weighted means. Every
resample is one row of a count matrix (how often each image was drawn), so the work is matrix products, no Java.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pycocoevalcap.cider.cider_scorer import precook as cider_precook
from scipy import sparse

from utils.java_scorers import meteor_from_stats, meteor_summable

LEVEL = 0.95
RESAMPLES = 1000
CHUNK = 25  # resamples per matrix product: bounds memory at (n-grams x CHUNK) floats
CIDER_N, CIDER_SIGMA = 4, 6.0
# The corpus metrics that get intervals, in table order; per-image means given by callers join them.
INTERVAL_METRICS = ("bleu_4", "meteor", "rouge_l", "cider")


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) counts: how often each of n images is drawn in each resample of n draws with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n)) + (np.arange(resamples) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


# ---------------------------------------------------------------------------
# BLEU-4
# ---------------------------------------------------------------------------


def bleu_stats(hypotheses: list[str], references: list[list[str]], counts=None) -> np.ndarray:
    """(n, 10) per image: hypothesis length, closest reference length, guessed 1..4-grams, clipped correct 1..4-grams.

    As pycocoevalcap's bleu_scorer cook_refs / cook_test count them (the closest length is BleuScorer's 'closest'
    option), from the n-gram counts CIDEr-D needs too (counts: (hypothesis counts, reference counts), else made here).
    """
    hyp_counts, ref_counts = counts or _ngram_counts(hypotheses, references)
    rows = []
    for hyp, refs, hyp_grams, ref_grams in zip(hypotheses, references, hyp_counts, ref_counts):
        testlen = len(hyp.split())
        reflen = min((abs(len(r.split()) - testlen), len(r.split())) for r in refs)[1]
        clip: dict[tuple, int] = {}
        for grams in ref_grams:
            for g, count in grams.items():
                clip[g] = max(clip.get(g, 0), count)
        correct = [0] * CIDER_N
        for g, count in hyp_grams.items():
            correct[len(g) - 1] += min(clip.get(g, 0), count)
        rows.append([testlen, reflen, *(max(0, testlen - k + 1) for k in range(1, CIDER_N + 1)), *correct])
    return np.array(rows, np.float64).reshape(len(rows), 10)


def _ngram_counts(hypotheses: list[str], references: list[list[str]]) -> tuple[list, list]:
    """1..4-gram counts of every hypothesis and reference (pycocoevalcap's precook: split on whitespace)."""
    return ([cider_precook(h, CIDER_N) for h in hypotheses],
            [[cider_precook(r, CIDER_N) for r in refs] for refs in references])


def bleu4_from_stats(summed: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 from summed statistics (..., 10), as BleuScorer.compute_score does it."""
    small, tiny = 1e-9, 1e-15
    testlen, reflen, guess, correct = summed[..., 0], summed[..., 1], summed[..., 2:6], summed[..., 6:10]
    bleu = np.prod((correct + tiny) / (guess + small), axis=-1) ** 0.25
    ratio = (testlen + tiny) / (reflen + small)
    with np.errstate(divide="ignore", over="ignore"):
        penalty = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    return bleu * penalty


# ---------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------


class CiderDStats:
    """CIDEr-D (pycocoevalcap's Cider, n=4, sigma=6) as sparse matrices, so any reweighting of the images (a
    resample) is scored by matrix products: document frequencies, tf-idf norms and clipped overlaps are all linear
    in the squared idf weights of the n-grams."""

    def __init__(self, hypotheses: list[str], references: list[list[str]], counts=None):
        index: dict[tuple, int] = {}
        hyp_counts, ref_counts = counts or _ngram_counts(hypotheses, references)
        df_rows, df_cols, a, r_, h = [], [], [], [], []  # a, r_, h: (row, n-gram, value) of three matrices
        pairs_image, penalty = [], []
        for i, (hyp, refs) in enumerate(zip(hyp_counts, ref_counts)):
            seen = {index.setdefault(g, len(index)) for ref in refs for g in ref}
            df_rows += [i] * len(seen)
            df_cols += sorted(seen)
            h += [(CIDER_N * i + len(g) - 1, index.setdefault(g, len(index)), tf * tf) for g, tf in hyp.items()]
            hyp_len = sum(tf for g, tf in hyp.items() if len(g) == 2)  # pycocoevalcap's "length": bigram count
            for ref in refs:
                pair = len(pairs_image)
                pairs_image.append(i)
                r_ += [(CIDER_N * pair + len(g) - 1, index[g], tf * tf) for g, tf in ref.items()]
                a += [(CIDER_N * pair + len(g) - 1, index[g], min(hyp[g], tf) * tf) for g, tf in ref.items() if g in hyp]
                ref_len = sum(tf for g, tf in ref.items() if len(g) == 2)
                penalty.append(np.exp(-((hyp_len - ref_len) ** 2) / (2 * CIDER_SIGMA**2)))
        n, pairs, grams = len(hypotheses), len(pairs_image), len(index)
        self.n = n
        doc = sparse.csr_matrix((np.ones(len(df_rows)), (df_rows, df_cols)), shape=(n, grams)).tocsc()
        merge = self._merge_columns(doc)
        self.doc = doc[:, self.shared].T.tocsr()  # (shared grams, images)
        pair_rows = np.repeat(np.asarray(pairs_image, np.int64), CIDER_N)
        overlap = _matrix(a, CIDER_N * pairs, grams)
        # A (reference, n) row without a shared n-gram scores 0 whatever the weights: only the others are computed.
        self.active = np.flatnonzero(np.diff(overlap.indptr))
        self.overlap = (overlap @ merge)[self.active]
        self.ref_norm = (_matrix(r_, CIDER_N * pairs, grams) @ merge)[self.active]
        self.hyp_norm = _matrix(h, CIDER_N * n, grams) @ merge
        self.hyp_row = (pair_rows * CIDER_N + np.tile(np.arange(CIDER_N), pairs))[self.active]  # its hypothesis row
        refs_per_image = np.bincount(np.asarray(pairs_image, np.int64), minlength=n)
        # Sums a row's similarity into its image, with pycocoevalcap's mean over n and division by the references.
        scale = np.repeat(np.asarray(penalty), CIDER_N) * 10.0 / CIDER_N / refs_per_image[pair_rows]
        self.to_image = sparse.csr_matrix((scale[self.active], (pair_rows[self.active], np.arange(len(self.active)))),
                                          shape=(n, len(self.active)))

    def _merge_columns(self, doc: sparse.csc_matrix) -> sparse.csr_matrix:
        """(grams, columns) 0/1 matrix folding n-grams that share their idf into one column, an exact speed-up.

        An n-gram in the references of one image j only has df = (times j is drawn), an n-gram in no reference
        df = 0: their idf depends on one count, so they fold into one column per image and one for "nowhere".
        Only n-grams of several images' references keep a column of their own.
        """
        support = np.diff(doc.indptr)
        self.shared = np.flatnonzero(support > 1)
        owner = np.full(doc.shape[1], -1)
        single = np.flatnonzero(support == 1)
        owner[single] = doc.indices[doc.indptr[single]]
        columns = np.where(support > 1, 0, np.where(support == 1, len(self.shared) + owner, len(self.shared) + self.n))
        columns[self.shared] = np.arange(len(self.shared))
        return sparse.csr_matrix((np.ones(doc.shape[1]), (np.arange(doc.shape[1]), columns)),
                                 shape=(doc.shape[1], len(self.shared) + self.n + 1))

    def per_image(self, weights: np.ndarray) -> np.ndarray:
        """(n, b) per-image CIDEr-D for b weightings of the images (rows of `weights`, shape (b, n))."""
        weights = np.atleast_2d(weights)
        log_total = np.log(weights.sum(axis=1))[None, :]  # log of the resample's number of documents
        shared = log_total - np.log(np.maximum(np.asarray(self.doc @ weights.T), 1.0))
        single = log_total - np.log(np.maximum(weights.T, 1.0))
        idf2 = np.concatenate([shared, single, log_total]) ** 2  # (columns, b), see _merge_columns
        overlap, ref, hyp = self.overlap @ idf2, self.ref_norm @ idf2, (self.hyp_norm @ idf2)[self.hyp_row]
        norms = np.sqrt(hyp * ref)
        # pycocoevalcap divides only when both norms are non-zero; when one is 0 the overlap is 0 too.
        sim = np.divide(overlap, norms, out=overlap, where=norms > 0)
        return np.asarray(self.to_image @ sim)

    def corpus(self, weights: np.ndarray) -> np.ndarray:
        """(b,) corpus CIDEr-D, the weighted mean of per-image scores under each weighting."""
        weights = np.atleast_2d(weights)
        return (self.per_image(weights) * weights.T).sum(axis=0) / weights.sum(axis=1)


def _matrix(triplets: list[tuple], rows: int, cols: int) -> sparse.csr_matrix:
    data = np.array(triplets, np.float64).reshape(-1, 3)
    return sparse.csr_matrix((data[:, 2], (data[:, 0].astype(np.int64), data[:, 1].astype(np.int64))), shape=(rows, cols))


# ---------------------------------------------------------------------------
# One prediction set's statistics, and the intervals
# ---------------------------------------------------------------------------


@dataclass
class CorpusStats:
    """Per-image statistics of one set of predictions on fixed images (same order for a paired comparison)."""

    bleu: np.ndarray  # (n, 10), see bleu_stats
    cider: CiderDStats
    means: dict[str, np.ndarray] = field(default_factory=dict)  # per-image metrics whose corpus value is the mean
    meteor: np.ndarray | None = None  # (n, 23) METEOR statistics as summed (meteor_summable), None without METEOR

    @classmethod
    def build(cls, hypotheses: list[str], references: list[list[str]], means: dict[str, np.ndarray] | None = None,
              meteor: np.ndarray | None = None) -> "CorpusStats":
        counts = _ngram_counts(hypotheses, references)
        return cls(bleu_stats(hypotheses, references, counts), CiderDStats(hypotheses, references, counts),
                   {k: np.asarray(v, np.float64) for k, v in (means or {}).items()},
                   None if meteor is None else meteor_summable(meteor))

    def metrics(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Every corpus metric under each weighting of the images: rows of weights (b, n) -> {metric: (b,)}."""
        weights = np.atleast_2d(np.asarray(weights, np.float64))
        total = weights.sum(axis=1)
        out = {"bleu_4": bleu4_from_stats(weights @ self.bleu), "cider": self.cider.corpus(weights)}
        if self.meteor is not None:
            out["meteor"] = meteor_from_stats(weights @ self.meteor)
        out.update({name: (weights @ values) / total for name, values in self.means.items()})
        return out


def _resampled(stats: CorpusStats, counts: np.ndarray) -> dict[str, np.ndarray]:
    parts = [stats.metrics(counts[start:start + CHUNK]) for start in range(0, len(counts), CHUNK)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _interval(values: np.ndarray, resamples: int) -> dict:
    alpha = (1 - LEVEL) / 2
    low, high = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return {"low": float(low), "high": float(high), "level": LEVEL, "resamples": resamples}


def bootstrap_intervals(stats: CorpusStats, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, dict]:
    """{metric: {low, high, level, resamples}}: percentile intervals over `resamples` image resamples (seeded)."""
    counts = resample_counts(stats.bleu.shape[0], resamples, seed)
    return {key: _interval(values, resamples) for key, values in _resampled(stats, counts).items()}


def paired_change_intervals(before: CorpusStats, after: CorpusStats, resamples: int = RESAMPLES,
                            seed: int = 0) -> dict[str, dict]:
    """{metric: {value, low, high, level, resamples, significant}} of after - before on the same images: both are
    scored on the same resamples, so what the images have in common cancels. Significant: the interval excludes 0."""
    if before.bleu.shape[0] != after.bleu.shape[0]:
        raise ValueError("a paired comparison needs the same images in both prediction sets")
    ones = np.ones((1, before.bleu.shape[0]))
    point_before, point_after = before.metrics(ones), after.metrics(ones)
    counts = resample_counts(before.bleu.shape[0], resamples, seed)
    first, second = _resampled(before, counts), _resampled(after, counts)
    out = {}
    for key in first.keys() & second.keys():
        interval = _interval(second[key] - first[key], resamples)
        significant = interval["low"] > 0 or interval["high"] < 0
        out[key] = {"value": float(point_after[key][0] - point_before[key][0]), **interval, "significant": significant}
    return out


def mean_intervals(means: dict[str, np.ndarray], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, dict]:
    """Intervals of per-image metrics whose corpus value is their mean (CLIP-S), for a set without references."""
    means = {key: np.asarray(values, np.float64) for key, values in means.items() if len(values)}
    if not means:
        return {}
    counts = resample_counts(len(next(iter(means.values()))), resamples, seed)
    total = counts.sum(axis=1)
    return {key: _interval(counts @ values / total, resamples) for key, values in means.items()}


def paired_mean_changes(before: dict[str, np.ndarray], after: dict[str, np.ndarray], resamples: int = RESAMPLES,
                        seed: int = 0) -> dict[str, dict]:
    """paired_change_intervals for per-image means alone: after - before on the same images, in the same order."""
    out = {}
    for key in before.keys() & after.keys():
        diff = np.asarray(after[key], np.float64) - np.asarray(before[key], np.float64)
        if not len(diff):
            continue
        interval = mean_intervals({key: diff}, resamples, seed)[key]
        out[key] = {"value": float(diff.mean()), **interval, "significant": interval["low"] > 0 or interval["high"] < 0}
    return out
