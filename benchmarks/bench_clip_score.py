"""CLIP-S speed on this machine: a random CLIP of ViT-B/32's shape (CLIPConfig defaults), images and captions per second.

    python benchmarks/bench_clip_score.py [--images 64] [--batch_sizes 8,32]

Counts what --eval adds to captioning: the image embedding (on images already decoded by the caption loop, as
the hook gets them) plus one caption embedding per image. The random weights cost what the real ones do; the
test tokenizer has no BPE merges, so a caption is one token per character (cut at 77), about 4x the tokens the
real tokenizer makes: the caption rate here is a lower bound.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # as git_qlora_main.py does before torch loads (shared cores)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.small_clip import build_small_clip  # noqa: E402
from utils.clip_score import compute_clip_scores, load_clip  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch_sizes", default="8,32")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(args.images)]
    captions = {f"{i}.jpg": f"a photo of a red car number {i} parked next to a tree on a sunny street" for i in range(args.images)}
    with tempfile.TemporaryDirectory() as folder:
        embedder = load_clip(str(build_small_clip(Path(folder), sizes=None)))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ViT-B/32 shape, {args.images} images 500x375")
        embedder.embed_images(images[:2])  # warm-up
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            start, cpu = time.perf_counter(), time.process_time()
            rows = [embedder.embed_images(images[i:i + batch]) for i in range(0, len(images), batch)]
            image_s, image_cpu = time.perf_counter() - start, time.process_time() - cpu
            embeddings = dict(zip(captions, np.concatenate(rows)))
            start, cpu = time.perf_counter(), time.process_time()
            compute_clip_scores(embedder, embeddings, captions)
            text_s, text_cpu = time.perf_counter() - start, time.process_time() - cpu
            # CPU seconds (all threads) per image are less sensitive to other jobs on the machine than wall time.
            per_image_cpu = (image_cpu + text_cpu) / args.images
            print(f"batch {batch}: wall: images {args.images / image_s:.1f}/s, captions {args.images / text_s:.1f}/s, "
                  f"CLIP-S {args.images / (image_s + text_s):.1f} images/s; CPU {per_image_cpu:.3f} s per image "
                  f"(= {torch.get_num_threads() / per_image_cpu:.1f} images/s on {torch.get_num_threads()} free cores)")


if __name__ == "__main__":
    main()
