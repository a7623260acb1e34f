"""Issue 18: would int8 in the decoder (its Linear layers, and the LM head) make compiled greedy captions faster?

    python benchmarks/bench_decoder_int8.py [--variants bf16,int8_dynamic,...] [--batches 6] [--steps 40]

A git-base-sized random GIT (GitConfig() defaults) in bf16, batch 8, 20 new tokens, captioned the way
`--caption_precision auto --compile on` does on a CPU with AVX-512 VNNI and no AMX (speed_up_vision_tower: the vision
tower in int8 and compiled, the decoder's prefill and one-token step compiled). Each variant runs in its own child
process (its own compile), and changes only the decoder:
  bf16                 as the product does today (the decoder in bf16);
  int8_dynamic         the decoder layers' Linear layers in torchao int8 (dynamic int8 activations, int8 weights);
  int8_dynamic_head    those and the LM head (`output`) the same way;
  int8_weight_only     the decoder layers' Linear layers as int8 weights with bf16 activations (torchao).
Also, in the same run, the eager ceiling: bare transformers `generate` on the same weights in bf16 at batch 8.
Prints one JSON line per variant (milliseconds per batch, for the vision tower, the prefill and one step, and the
share of token ids equal to the bf16 variant's; on random weights, so agreement here says little: captions of a
trained model are what decide fidelity) and the load averages.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH, TOKENS = 8, 20
VARIANTS = ("bf16", "int8_dynamic", "int8_dynamic_head", "int8_weight_only")


def build_model():
    import torch
    from transformers import GitConfig, GitForCausalLM

    torch.manual_seed(0)
    return GitForCausalLM(GitConfig()).to(torch.bfloat16).eval()


def quantize_decoder(model, variant: str) -> None:
    import torch
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    def layers(module, name):
        return isinstance(module, torch.nn.Linear) and name.startswith("git.encoder.")

    def head(module, name):
        return isinstance(module, torch.nn.Linear) and name == "output"

    if variant.startswith("int8_dynamic"):
        quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=layers)
    if variant == "int8_dynamic_head":
        quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=head)
    if variant == "int8_weight_only":
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=layers)


def seconds_per_call(fn, calls: int) -> float:
    import torch

    with torch.no_grad():
        fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
    return (time.perf_counter() - start) / calls


def run_variant(variant: str, batches: int, steps: int, out: Path) -> dict:
    import torch

    from models.caption_speed import speed_up_vision_tower
    from models.greedy_decoding import KeyValueCache, fast_decoding, greedy_caption_ids

    model = build_model()
    pixels = torch.randn(BATCH, 3, 224, 224, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    if variant == "eager_ceiling":
        with torch.no_grad():
            ids = model.generate(pixel_values=pixels, max_new_tokens=TOKENS, do_sample=False)
        batch = seconds_per_call(lambda: model.generate(pixel_values=pixels, max_new_tokens=TOKENS, do_sample=False), batches)
        return {"variant": variant, "batch_ms": batch * 1e3, "images_per_second": BATCH / batch, "tokens": ids.shape[1]}
    quantize_decoder(model, variant)
    done = speed_up_vision_tower(model, "on", "auto", "cpu", 64, BATCH, tokens=TOKENS, int8_where_it_pays=True)
    start = time.perf_counter()
    ids = greedy_caption_ids(model, pixels, TOKENS)
    first = time.perf_counter() - start
    batch = seconds_per_call(lambda: greedy_caption_ids(model, pixels, TOKENS), batches)
    git, fast = model.git, fast_decoding(model)
    with torch.no_grad():
        visual = git.visual_projection(git.image_encoder(pixels).last_hidden_state)
        hidden = torch.cat((visual, git.embeddings(input_ids=torch.full((BATCH, 1), model.config.bos_token_id))), dim=1)
    attention = git.encoder.layer[0].attention.self
    cache = KeyValueCache(len(git.encoder.layer), BATCH, attention.num_attention_heads, attention.attention_head_size,
                          fast.capacity, hidden.dtype, "cpu")
    tokens, slot = torch.full((BATCH, 1), 1000), torch.tensor([hidden.shape[1]])
    torch.save(ids, out / f"ids_{variant}.pt")
    return {"variant": variant, "done": done, "first_batch_s": first, "batch_ms": batch * 1e3,
            "images_per_second": BATCH / batch,
            "tower_ms": seconds_per_call(lambda: git.image_encoder(pixels), batches) * 1e3,
            "prefill_ms": seconds_per_call(lambda: fast.prefill(hidden, cache.keys, cache.values), batches) * 1e3,
            "step_ms": seconds_per_call(lambda: fast.step(tokens, torch.tensor([1]), slot, cache.keys, cache.values), steps) * 1e3,
            "tokens": ids.shape[1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(("eager_ceiling",) + VARIANTS))
    parser.add_argument("--batches", type=int, default=6, help="timed batches per variant (after one warm-up)")
    parser.add_argument("--steps", type=int, default=40, help="timed one-token steps per variant")
    parser.add_argument("--output_dir", default=str(ROOT / "results" / "bench_decoder_int8"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args.batches, args.steps, out)), flush=True)
        return 0
    import torch

    for variant in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--batches", str(args.batches),
                               "--steps", str(args.steps), "--output_dir", str(out)], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(json.dumps({"variant": variant, "failed": proc.stderr[-2000:]}), flush=True)
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        reference, mine = out / "ids_bf16.pt", out / f"ids_{variant}.pt"
        if variant != "eager_ceiling" and reference.exists():
            a, b = torch.load(reference, weights_only=True), torch.load(mine, weights_only=True)
            result["rows_equal_to_bf16"] = float((a == b).all(dim=1).float().mean())
        result["load"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
