"""How fast captioning can be at best on this machine: the matrix FLOPs of a caption, and the host's matrix rate.

    python benchmarks/bench_caption_flops.py [--output_dir results/bench_speed]   # after bench_speed.py

Counted with torch's own FlopCounterMode (matrix products: mm, addmm, bmm, attention), not by a formula, on the
merged model and test pictures bench_speed.py built and trained (git-base-sized random GIT), one batch of 8, the
benchmark's 20 new tokens at most (its captions end where the model says EOS, as in the benchmark):
  eager ceiling  greedy `model.generate` of transformers, as bench_speed.py's eager ceiling row runs it;
  this project   models/greedy_decoding.py's greedy_caption_ids, as --inference runs it; split into the vision
                 tower and the decoder (its prefill over the image tokens and BOS, and its one-token steps).
The counts do not depend on the dtype, so they are taken in fp32. In the same process, a bare bf16 (or, where bf16
is not native, fp32) `linear` of the vision tower's MLP shape gives this host's matrix rate; at that rate the
project's products take the "floor" seconds per batch, and the eager ceiling's measured seconds per batch (from
bench_speed.json) over that floor is the most any path computing in that dtype can gain over it. Nothing is
asserted: numbers for the README.
"""

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_speed import CAPTION_BATCH as BATCH, TOKENS  # noqa: E402 - the benchmark this one explains


def count(call) -> tuple[int, object]:
    """(matrix FLOPs of call(), its result)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        value = call()
    return counter.get_total_flops(), value


def matrix_rate(dtype, rounds: int = 20) -> float:
    """FLOP/s of a bare linear of the ViT-B MLP's shape (8 images x 197 tokens, 768 -> 3072), best of `rounds`."""
    import torch

    x, w = torch.randn(BATCH * 197, 768, dtype=dtype), torch.randn(3072, 768, dtype=dtype)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return 2 * x.shape[0] * 768 * 3072 / best


def caption_flops(out: Path) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    from models.greedy_decoding import greedy_caption_ids

    merged = out / "runs" / "run" / "merged_model"
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    names = sorted(row["image_name"] for row in csv.DictReader((out / "captions_merged.csv").open()))[:BATCH]
    images = [Image.open(out / "data" / "test" / name).convert("RGB") for name in names]
    pixels = AutoProcessor.from_pretrained(merged)(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        project, ids = count(lambda: greedy_caption_ids(model, pixels, TOKENS))
        generate, _ = count(lambda: model.generate(pixel_values=pixels, max_new_tokens=TOKENS, do_sample=False))
        tower, _ = count(lambda: model.git.image_encoder(pixels))
    return {"tokens_generated": ids.shape[1] - 1, "generate": generate, "project": project, "tower": tower,
            "decoder": project - tower}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("results/bench_speed"))
    args = parser.parse_args()
    out = args.output_dir.resolve()
    import torch

    from models.git_qlora import resolve_compute_dtype, resolve_device
    from utils.config import Config

    flops = caption_flops(out)
    dtype = resolve_compute_dtype(Config(mode="inference"), resolve_device())  # what --caption_precision auto uses
    rate = matrix_rate(dtype)
    floor = flops["project"] / rate
    result = {"batch": BATCH, "tokens_generated": flops["tokens_generated"], "dtype": str(dtype).replace("torch.", ""),
              "gflop_per_batch": {k: round(v / 1e9, 1) for k, v in flops.items() if k != "tokens_generated"},
              "matrix_gflop_per_s": round(rate / 1e9, 1), "project_floor_seconds_per_batch": round(floor, 3)}
    measured = out / "bench_speed.json"
    if measured.is_file():
        rows = json.loads(measured.read_text())
        ceiling = BATCH / rows["eager_ceiling"]["images_per_second"]
        result["eager_ceiling_seconds_per_batch"] = round(ceiling, 3)
        result["eager_ceiling_gflop_per_s"] = round(flops["generate"] / 1e9 / ceiling, 1)
        result["most_any_path_gains_over_the_ceiling"] = round(ceiling / floor, 2)
        result["rows"] = {name: {"vs_eager_ceiling": round(row["images_per_second"] * ceiling / BATCH, 3),
                                 "gflop_per_s": round(flops["project"] / 1e9 * row["images_per_second"] / BATCH, 1)}
                          for name, row in rows.items()
                          if name.startswith("caption_merged") or name.startswith("caption_adapter")}
    result["threads"], result["load"] = torch.get_num_threads(), [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
