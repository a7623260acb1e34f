"""Time QLoRA training, captioning and merging on a git-base-sized random GIT through the real CLI code paths.

    python benchmarks/bench_git_base.py --steps 20 --batch_size 8 [--gradient_checkpointing] [--quantization_bits 4]

Prints one JSON object (seconds per step, images per second, peak memory) and writes it to OUT/bench.json.
The model is random (GitConfig() defaults, BERT-sized vocabulary), so only speed and memory mean anything.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from git_qlora_main import main, setup_logging  # noqa: E402
from models.small_git import GIT_BASE_SIZE, GIT_BASE_VOCAB, build_small_git  # noqa: E402
from scripts.inference import caption_folder, load_caption_model  # noqa: E402
from utils.config import Config  # noqa: E402
from utils.dataset_utils import find_images  # noqa: E402
from utils.demo_data import every_caption, write_demo_dataset  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("results/bench"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--caption_batch_size", type=int, default=16)
    parser.add_argument("--images", type=int, default=64, help="training pictures (224 px)")
    parser.add_argument("--test_images", type=int, default=32)
    parser.add_argument("--quantization_bits", default="4")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--merge", action="store_true", help="also time --merge_weights")
    return parser.parse_args()


def prepare(out: Path, args) -> tuple[Path, Path]:
    data, model = out / "data", out / "git_base_random"
    if not (data / "captions.csv").is_file():
        write_demo_dataset(data, args.images, args.test_images, seed=0, size=GIT_BASE_SIZE.image_size)
    if not (model / "config.json").is_file():
        build_small_git(model, every_caption(), GIT_BASE_SIZE, seed=0, vocab_size=GIT_BASE_VOCAB)
    return data, model


def time_training(out: Path, data: Path, model: Path, run: str, args) -> dict:
    argv = ["--train", "--train_dir", str(data / "train"), "--captions_file", str(data / "captions.csv"),
            "--model_name", str(model), "--output_dir", str(out), "--run_name", run, "--split_ratio", "0",
            "--batch_size", str(args.batch_size), "--max_steps", str(args.steps), "--fgd_model", "none",
            "--quantization_bits", args.quantization_bits, "--logging_steps", "5", "--num_workers", "4"]
    if args.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    assert main(argv) == 0
    metrics = json.loads((out / run / "metrics.json").read_text())
    keys = ("seconds_per_step", "train_images_per_second", "peak_memory_mb", "peak_memory_kind", "precision", "train_seconds")
    return {k: metrics[k] for k in keys}


def time_captioning(run_dir: Path, data: Path, args) -> dict:
    config = Config(mode="inference", output_dir=run_dir, batch_size=args.caption_batch_size, max_new_tokens=20)
    model, processor, config, _ = load_caption_model(config)
    names = find_images(data / "test")
    caption_folder(model, processor, data / "test", names[: args.caption_batch_size], args.caption_batch_size, 20, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = caption_folder(model, processor, data / "test", names, args.caption_batch_size, 20, num_workers=2, progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"caption_images_per_second": result.images_per_second, "caption_images": len(result.captions),
            "caption_peak_cuda_mb": peak}


def main_bench() -> int:
    args = parse_args()
    setup_logging()
    out = args.output_dir
    data, model = prepare(out, args)
    run = f"q{args.quantization_bits}-b{args.batch_size}{'-gc' if args.gradient_checkpointing else ''}-{int(time.time())}"
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size, "steps": args.steps,
               "gradient_checkpointing": args.gradient_checkpointing}
    summary.update(time_training(out, data, model, run, args))
    summary.update(time_captioning(out / run, data, args))
    if args.merge:
        start = time.perf_counter()
        assert main(["--merge_weights", "--output_dir", str(out / run)]) == 0
        summary["merge_seconds"] = time.perf_counter() - start
        summary["merge_report"] = {k: v for k, v in json.loads((out / run / "merge_report.json").read_text()).items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
