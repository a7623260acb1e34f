"""Time the COCO protocol on N synthetic COCO-like captions (5 references each): PTBTokenizer + BLEU/METEOR/ROUGE-L/
CIDEr-D + 1,000-resample intervals, in one process. python benchmarks/bench_scoring.py [N]"""

import random
import resource
import sys
import time

sys.path.insert(0, ".")

from utils.confidence import CorpusStats, bootstrap_intervals  # noqa: E402
from utils.evaluation import evaluate_captions  # noqa: E402

SUBJECTS = ("a man", "a woman", "two dogs", "a cat", "a young boy", "a group of people", "a red bus", "an old car",
            "a brown horse", "a little girl", "three birds", "a plate of food", "a large elephant", "a skier")
VERBS = ("sitting on", "standing next to", "riding", "walking down", "lying on", "looking at", "parked near",
         "playing with", "eating", "flying over", "holding", "jumping over")
OBJECTS = ("a wooden bench", "the beach", "a busy street", "a green field", "a kitchen table", "the snow",
           "a frisbee", "a tall building", "the water", "a surfboard", "a pizza", "a tennis racket", "the grass")
EXTRAS = ("", "", " in the park", " at night", " on a sunny day", " near a tree", ", smiling", " in the city")


def sentence(rng: random.Random) -> str:
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(EXTRAS)}"
    return (text[0].upper() + text[1:] + ".") if rng.random() < 0.5 else text


def main(n: int = 5000) -> None:
    rng = random.Random(0)
    references = {f"{i:05d}.jpg": [sentence(rng) for _ in range(5)] for i in range(n)}
    predictions = {name: rng.choice(refs) if rng.random() < 0.3 else sentence(rng) for name, refs in references.items()}
    start = time.perf_counter()
    scores = evaluate_captions(predictions, references, fgd_model=None, caption_tokenizer="ptb")
    total = time.perf_counter() - start
    own, java = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    hyps = [predictions[k] for k in sorted(predictions)]
    refs = [references[k] for k in sorted(predictions)]
    start = time.perf_counter()
    stats = CorpusStats.build(hyps, refs)
    built = time.perf_counter() - start
    bootstrap_intervals(stats)
    boot = time.perf_counter() - start - built
    m = scores.metrics
    print(f"{n} captions x 5 references, ptb + METEOR + intervals: {total:.1f} s in all; CPU time "
          f"{own.ru_utime + own.ru_stime:.1f} s in Python, {java.ru_utime + java.ru_stime:.1f} s in Java")
    print(f"  intervals alone: {built:.1f} s building statistics + {boot:.1f} s for 1,000 resamples")
    print("  " + ", ".join(f"{k} {m[k]:.4f} [{m['confidence'][k]['low']:.4f}, {m['confidence'][k]['high']:.4f}]"
                           for k in ("bleu_4", "meteor", "rouge_l", "cider")))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
