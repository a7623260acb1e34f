"""How much faster than the full fine-tune `--train` can be at best on a machine: the matrix FLOPs of each.

    python benchmarks/bench_train_flops.py [--output_dir results/bench_speed]   # after bench_speed.py --only training

Counted with torch's own FlopCounterMode (matrix products: mm, addmm, bmm, convolutions, attention), not by a
formula, on the data and model bench_speed.py built (its git-base-sized random GIT, batch 4, the same captions):
  reference      one step of the fp32 full fine-tune: forward and backward through the vision tower and decoder;
  project step   one step as --train runs it on cached features (CaptionTrainer.compute_loss: LoRA over the
                 frozen base, logits of the caption rows only), forward and backward; the base in fp32 here,
                 since FlopCounterMode cannot see bitsandbytes' 4-bit kernels, which do the same products;
  filling        the vision tower's forward on one image, which --train pays once per image for its cache.
The ratio of the work, reference / (step + filling spread over the steps), is the speed ratio --train would reach
if both ran their products at the same rate. Where the host computes both in fp32 (no native bf16), the measured
ratio cannot exceed it; with bf16 products at twice fp32's rate it can. Given bench_training.json (from
bench_speed.py --only training), the achieved GFLOP/s of each program is printed beside it. Nothing is asserted.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRAIN_BATCH = 4  # bench_speed.py's


def count(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def reference_step_flops(out: Path, batch: dict) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).train()
    return count(lambda: model(**batch).loss.backward())


def project_flops(out: Path, batch: dict) -> tuple[int, int]:
    """(one --train step on cached features, filling the cache for one image)."""
    from models.git_qlora import load_base_model, prepare_for_training
    from models.training_speed import last_layer_over_caption_rows
    from models.vision_cache import as_pixel_values, encode_images, vision_from_cache
    from scripts.caption_trainer import caption_loss
    from utils.config import Config

    # An fp32 base, not the 4-bit one: bitsandbytes' 4-bit products are its own kernels, which FlopCounterMode does
    # not see; a 4-bit layer dequantizes its weight and multiplies, so the products are the same.
    config = Config(mode="train", model_name=str(out / "model"), quantization_bits=32)
    model = prepare_for_training(load_base_model(config, "cpu"), config)
    fill = count(lambda: encode_images(model, batch["pixel_values"][:1], None))
    features = as_pixel_values(encode_images(model, batch["pixel_values"], None).detach())
    labels = batch["labels"]

    def step():
        # As CaptionTrainer.compute_loss (scripts/caption_trainer.py) computes it.
        with vision_from_cache(model), last_layer_over_caption_rows(model, labels.shape[1]):
            logits = model(pixel_values=features, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=labels.shape[1], use_cache=False).logits
            caption_loss(logits, labels).backward()

    model.train()
    return count(step), fill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("results/bench_speed"))
    parser.add_argument("--epochs", type=int, default=3, help="--train's (its default)")
    args = parser.parse_args()
    out = args.output_dir.resolve()
    from transformers import AutoProcessor

    from utils.dataset_utils import CaptionCollator, CaptionDataset, collect_examples

    examples = collect_examples(out / "data" / "train", out / "data" / "one_caption.csv")
    dataset = CaptionDataset(out / "data" / "train", examples)
    batch = CaptionCollator(AutoProcessor.from_pretrained(out / "model"), 40)([dataset[i] for i in range(TRAIN_BATCH)])
    reference = reference_step_flops(out, batch)
    step, fill = project_flops(out, batch)
    steps = -(-len(examples) // TRAIN_BATCH) * args.epochs
    per_step = step + fill * len(examples) / steps
    result = {"images": len(examples), "steps": steps, "reference_step_gflop": round(reference / 1e9, 1),
              "project_step_gflop": round(step / 1e9, 1), "filling_gflop_per_image": round(fill / 1e9, 1),
              "project_gflop_per_step_with_filling": round(per_step / 1e9, 1),
              "work_ratio": round(reference / per_step, 2), "work_ratio_steps_alone": round(reference / step, 2)}
    measured = out / "bench_training.json"
    if measured.is_file():
        for pair in json.loads(measured.read_text())["pairs"]:
            ref, mine = pair["reference_full_finetune"], pair["project_train"]
            result.setdefault("measured", []).append({
                "speed_ratio": round(pair["speed_ratio"], 2),
                "reference_gflop_per_s": round(reference / 1e9 / ref["seconds_per_step"], 1),
                "project_step_gflop_per_s": round(step / 1e9 / mine["optimizer_step_seconds"], 1),
                "project_filling_gflop_per_s": round(fill * len(examples) / 1e9 / mine["feature_cache_seconds"], 1)})
    result["load"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
