"""Issue 18 item 3: does torch.compile, or dropping GIT's dropout, pay on the QLoRA training step on cached features?

    python benchmarks/bench_train_compile.py [--model results/bench_speed/model] [--steps 6]

The step is the one --train runs with its defaults on a git-base-sized model: 4-bit NF4 base (bf16 compute where
native), LoRA r16 on the decoder, cached image features in place of the vision tower, bf16 autocast, batch 4,
AdamW on the LoRA weights. Variants, each timed over --steps steps after two warm-up steps, in this one process:
  eager             as --train runs today;
  no_dropout        the base model's dropout modules set to p=0 (their masks and casts are the cost issue 8 named);
  compiled_layers   each decoder layer torch.compile'd (dynamic=False), the rest eager.
Prints one JSON line; load averages (uptime) are in it.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def build(model_dir: Path):
    import torch

    from models.git_qlora import load_base_model, prepare_for_training
    from utils.config import Config

    config = Config(mode="train", model_name=str(model_dir))
    model = prepare_for_training(load_base_model(config, "cpu"), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def time_steps(model, optimizer, steps: int, batch: int = 4, text: int = 24) -> tuple[float, float]:
    """(seconds per step after warm-up, seconds of the first step) on random cached features and captions."""
    import torch

    from models.training_speed import last_layer_over_caption_rows
    from models.vision_cache import as_pixel_values, feature_shape, vision_from_cache
    from scripts.caption_trainer import caption_loss

    tokens, width = feature_shape(model)
    torch.manual_seed(0)
    features = as_pixel_values(torch.randn(batch, tokens, width, dtype=torch.bfloat16))
    ids = torch.randint(1000, 2000, (batch, text))
    times = []
    model.train()
    with vision_from_cache(model):
        for _ in range(steps + 2):
            start = time.perf_counter()
            # The Trainer's loss (scripts/caption_trainer.py CaptionTrainer.compute_loss): caption logits only.
            with torch.autocast("cpu", dtype=torch.bfloat16), last_layer_over_caption_rows(model, text):
                logits = model(pixel_values=features, input_ids=ids, attention_mask=torch.ones_like(ids),
                               logits_to_keep=text, use_cache=False).logits
                loss = caption_loss(logits, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    return sum(times[2:]) / steps, times[0]


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("results/bench_speed/model"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", default="eager,no_dropout,compiled_layers")
    args = parser.parse_args()
    results = {"load_at_start": os.getloadavg()}
    for variant in args.variants.split(","):
        model, optimizer = build(args.model)
        if variant == "no_dropout":
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if variant == "compiled_layers":
            from models.vision_cache import git_model

            for layer in git_model(model).encoder.layer:
                layer.compile(dynamic=False)
        try:
            per_step, first = time_steps(model, optimizer, args.steps)
            results[variant] = {"seconds_per_step": round(per_step, 3), "first_step_seconds": round(first, 1), "load": os.getloadavg()}
        except Exception as error:  # noqa: BLE001 - a variant that cannot run is a result too
            results[variant] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        print(variant, results[variant], file=sys.stderr, flush=True)
        del model, optimizer
        torch._dynamo.reset()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
