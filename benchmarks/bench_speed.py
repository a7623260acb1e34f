"""This project's --train and --inference side by side with the references, on a git-base-sized random GIT.

    python benchmarks/bench_speed.py [--train_images 64] [--test_images 32] [--output_dir results/bench_speed]
    python benchmarks/bench_speed.py --only training [--rounds 3]   # the two training rows, in alternating pairs

Each figure comes from its own process, run one after another in this one invocation, so the ratios
compare runs on the same machine under the same conditions:
  references  a plain fp32 full fine-tune with AdamW, batch 4 (the HF captioning guide's way), and the GIT
              model card's captioning loop (fp32, one image per generate) on the trained weights (merged);
  this project  `--train` with its defaults (3 epochs, 4-bit QLoRA, LoRA r16 on the decoder), batch 4;
              `--inference --test_dir` with the run's adapter and with `--use_merged`, batch 8.
Captions are 20 tokens everywhere (--max_new_tokens 20; a random model never says [SEP] early). The model is
random (GitConfig() shapes: ViT-B/16 at 224 px, 6-layer decoder, 30,522-token vocabulary), so only speed and
memory mean anything. Peak memory is each process's max RSS. Writes OUT/bench_speed.json.
"""

import argparse
import csv
import shutil
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_BATCH, CAPTION_BATCH, TOKENS = 4, 8, 20


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("results/bench_speed"))
    parser.add_argument("--train_images", type=int, default=64, help="training pictures, one caption each")
    parser.add_argument("--test_images", type=int, default=96, help="pictures to caption (enough that the first batch's warm-up is a small share)")
    parser.add_argument("--reference_steps", type=int, default=8, help="timed steps of the full fine-tune (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="--only training: alternating (reference, --train) pairs")
    parser.add_argument("--only", choices=("all", "captioning", "training"), default="all",
                        help="captioning: skip the training comparison (the run is trained for 2 steps, enough to caption with)")
    parser.add_argument("--rows", help="comma-separated rows of the fast-path table to run (default: all); caption_fp32 and "
                        "eager_ceiling always run, being what the others are compared with")
    parser.add_argument("--reuse_run", action="store_true", help="keep OUT/runs/run from an earlier invocation instead of training it again")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one measurement in this process
    return parser.parse_args()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(out: Path, args) -> None:
    """The random git-base-sized checkpoint and 224 px pictures with one caption each (built once)."""
    from models.small_git import GIT_BASE_SIZE, GIT_BASE_VOCAB, build_small_git
    from utils.demo_data import every_caption, write_demo_dataset

    data = out / "data"
    if not (data / "one_caption.csv").is_file() or len(list((data / "test").glob("*.png"))) != args.test_images:
        shutil.rmtree(data, ignore_errors=True)
        write_demo_dataset(data, args.train_images, args.test_images, seed=0, size=GIT_BASE_SIZE.image_size)
        with open(data / "captions.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        first = {}
        for name, caption in rows[1:]:
            first.setdefault(name, caption)
        with open(data / "one_caption.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["image_name", "caption"], *first.items()])
    if not (out / "model" / "config.json").is_file():
        build_small_git(out / "model", every_caption(), GIT_BASE_SIZE, seed=0, vocab_size=GIT_BASE_VOCAB)


def reference_full_finetune(out: Path, args) -> dict:
    """fp32 GitForCausalLM, every weight trained with AdamW, batch 4, images decoded and processed each step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    from utils.dataset_utils import CaptionCollator, CaptionDataset, collect_examples

    data = out / "data"
    examples = collect_examples(data / "train", data / "one_caption.csv")
    dataset, collator = CaptionDataset(data / "train", examples), CaptionCollator(AutoProcessor.from_pretrained(out / "model"), 40)
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    seconds = []
    for step in range(args.reference_steps + 1):
        start = time.perf_counter()
        batch = collator([dataset[(step * TRAIN_BATCH + i) % len(dataset)] for i in range(TRAIN_BATCH)])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates the optimizer state
            seconds.append(time.perf_counter() - start)
    per_step = sum(seconds) / len(seconds)
    return {"seconds_per_step": per_step, "images_per_second": TRAIN_BATCH / per_step, "peak_rss_mb": peak_rss_mb()}


def reference_model_card(out: Path, args) -> dict:
    """The GIT model card's loop on the trained (merged) weights: fp32, one image per generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    from utils.dataset_utils import find_images, load_image

    folder = out / "runs" / "run" / "merged_model"
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    names = find_images(out / "data" / "test")
    start = time.perf_counter()
    for name in names:
        image = load_image(out / "data" / "test" / name)[0]
        pixel_values = processor(images=image, return_tensors="pt").pixel_values
        ids = model.generate(pixel_values=pixel_values, max_new_tokens=TOKENS)
        processor.batch_decode(ids, skip_special_tokens=True)
    seconds = time.perf_counter() - start
    return {"images_per_second": len(names) / seconds, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def run_cli(argv: list[str]) -> tuple[str, float]:
    """Run git_qlora_main.py in a child process; (its stderr, its peak RSS in MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, str(ROOT / "git_qlora_main.py"), *argv], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"git_qlora_main.py {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return proc.stderr, (peak if peak > before else float("nan")) / 1024


def project_train(out: Path, args) -> dict:
    data = out / "data"
    stderr, rss = run_cli(["--train", "--train_dir", str(data / "train"), "--captions_file", str(data / "one_caption.csv"),
                           "--model_name", str(out / "model"), "--output_dir", str(out / "runs"), "--run_name", "run",
                           "--batch_size", str(TRAIN_BATCH), "--split_ratio", "0", "--fgd_model", "none"])
    metrics = json.loads((out / "runs" / "run" / "metrics.json").read_text())
    keys = ("seconds_per_step", "train_images_per_second", "feature_cache_seconds", "optimizer_step_seconds", "global_step", "precision")
    cache = re.search(r"Image feature cache (on|off): (.*)", stderr)
    return {**{k: metrics[k] for k in keys}, "peak_rss_mb": rss, "feature_cache": cache.group(0) if cache else None}


def project_caption(out: Path, merged: bool) -> dict:
    argv = ["--inference", "--test_dir", str(out / "data" / "test"), "--output_dir", str(out / "runs" / "run"),
            "--batch_size", str(CAPTION_BATCH), "--max_new_tokens", str(TOKENS),
            "--predictions_file", str(out / f"captions_{'merged' if merged else 'adapter'}.csv")]
    stderr, rss = run_cli(argv + (["--use_merged"] if merged else []))
    rate = re.search(r"([0-9.]+) images/s", stderr)
    model = re.search(r"Captioning with (.*)", stderr)
    return {"images_per_second": float(rate.group(1)), "model": model.group(1) if model else None, "peak_rss_mb": rss}


# ---------------------------------------------------------------------------
# Past the eager ceiling (issue 18): every row captions the same test pictures; agreement is against the fp32 row.
# ---------------------------------------------------------------------------


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def test_names(out: Path) -> list[str]:
    from utils.dataset_utils import find_images

    return sorted(find_images(out / "data" / "test"))


def eager_ceiling(out: Path, args) -> dict:
    """Bare transformers generate with the merged weights at batch 8: the eager ceiling (no project code). In bf16
    where the device has it natively (issue 18's ceiling; fp16 on GPUs without it). A CPU without it emulates
    bf16 at ~1/6 of fp32's rate (README "Compiled and int8 captioning"), so there the ceiling is fp32, the
    dtype `auto` computes in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor
    from PIL import Image

    from models.git_qlora import half_dtype, has_native_bf16, resolve_device

    device = resolve_device()
    dtype = half_dtype(device) if has_native_bf16(device) or device == "cuda" else torch.float32
    folder = out / "runs" / "run" / "merged_model"
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    names = test_names(out)
    captions, seconds = {}, []
    for repeat in range(2):  # the first pass warms up (allocator, oneDNN primitives), the second is timed
        start = time.perf_counter()
        for i in range(0, len(names), CAPTION_BATCH):
            batch = names[i:i + CAPTION_BATCH]
            images = [Image.open(out / "data" / "test" / n).convert("RGB") for n in batch]
            pixel_values = processor(images=images, return_tensors="pt").pixel_values.to(device, dtype)
            with torch.no_grad():
                ids = model.generate(pixel_values=pixel_values, max_new_tokens=TOKENS, do_sample=False)
            captions.update(zip(batch, processor.batch_decode(ids, skip_special_tokens=True)))
        seconds.append(time.perf_counter() - start)
    from utils.text import tidy_caption

    return {"images_per_second": len(names) / seconds[-1], "warm_up_seconds": seconds[0], "load": load(), "dtype": str(dtype),
            "captions": {k: tidy_caption(v) for k, v in captions.items()}}


def product_caption(out: Path, merged: bool, compile_: str, precision: str) -> dict:
    """This project's captioning code (load_caption_model + caption_folder, as --inference runs them) in this
    process: one batch first (the compile, if any, happens there), then the whole folder timed."""
    from git_qlora_main import build_config, build_parser
    from scripts.inference import caption_folder, load_caption_model

    names = test_names(out)
    argv = ["--inference", "--test_dir", str(out / "data" / "test"), "--output_dir", str(out / "runs" / "run"),
            "--batch_size", str(CAPTION_BATCH), "--max_new_tokens", str(TOKENS), "--num_workers", "0",
            "--compile", compile_, "--caption_precision", precision] + (["--use_merged"] if merged else [])
    config = build_config(build_parser().parse_args(argv))
    start = time.perf_counter()
    model, processor, config, description = load_caption_model(config, len(names))
    load_seconds = time.perf_counter() - start
    first = caption_folder(model, processor, out / "data" / "test", names[:CAPTION_BATCH], CAPTION_BATCH, TOKENS, progress=False)
    result = caption_folder(model, processor, out / "data" / "test", names, CAPTION_BATCH, TOKENS, progress=False)
    return {"images_per_second": result.images_per_second, "first_batch_seconds": first.seconds,
            "load_seconds": load_seconds, "model": description, "load": load(), "captions": result.captions}


def fill_rate(out: Path, compile_: str, precision: str) -> dict:
    """Feature-cache filling as --train does it: the 4-bit training base's vision tower (under bf16 autocast where
    native), batches of 16, through fast_vision_tower_for_filling; one batch first (compile), then all timed."""
    import torch
    from PIL import Image

    from git_qlora_main import build_config, build_parser
    from models.caption_speed import fast_vision_tower_for_filling
    from models.git_qlora import load_base_model, load_processor, resolve_base_dtype, resolve_device, training_autocast
    from models.vision_cache import encode_images

    config = build_config(build_parser().parse_args(["--train", "--train_dir", str(out / "data" / "train"),
                                                     "--model_name", str(out / "model"), "--compile", compile_]))
    if precision == "fp32":  # the reference: the 4-bit tower computing in fp32, no autocast
        config = config.replace(bnb_4bit_compute_dtype="float32")
    else:
        config = config.replace(caption_precision=precision)
    device, batch = resolve_device(), 16
    model, processor = load_base_model(config, device), load_processor(str(out / "model"))
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(training_autocast(config, device))
    dtype = autocast or resolve_base_dtype(config, device)
    names = test_names(out)
    pixels = processor(images=[Image.open(out / "data" / "test" / n).convert("RGB") for n in names], return_tensors="pt").pixel_values
    with fast_vision_tower_for_filling(model, compile_, precision, device, len(names), batch, dtype):
        start = time.perf_counter()
        reference = encode_images(model, pixels[:batch], autocast)
        first = time.perf_counter() - start
        start = time.perf_counter()
        features = torch.cat([encode_images(model, pixels[i:i + batch], autocast) for i in range(0, len(names), batch)])
        seconds = time.perf_counter() - start
    torch.save(features.float(), out / f"features_{compile_}_{precision}.pt")
    return {"images_per_second": len(names) / seconds, "first_batch_seconds": first, "load": load()}


def compute_precision() -> str:
    """--caption_precision naming the compute dtype auto resolves to here (bf16 where native, else fp32; auto
    itself for fp16 GPUs, where auto never takes int8)."""
    import torch

    from models.git_qlora import resolve_compute_dtype, resolve_device
    from utils.config import Config

    dtype = resolve_compute_dtype(Config(mode="inference"), resolve_device())
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, "auto")


def fill_row(compile_: str, precision: str):
    def run(out: Path, args) -> dict:
        import torch

        result = fill_rate(out, compile_, precision)
        mine, exact = torch.load(out / f"features_{compile_}_{precision}.pt", weights_only=True), torch.load(out / "features_off_fp32.pt", weights_only=True)
        result["relative_error_vs_fp32"] = float((mine - exact).norm() / exact.norm())
        return result

    return run


def quick_run(out: Path, args) -> dict:
    """A run folder to caption with, without the training comparison: 2 steps of --train, then --merge_weights."""
    data = out / "data"
    run_cli(["--train", "--train_dir", str(data / "train"), "--captions_file", str(data / "one_caption.csv"),
             "--model_name", str(out / "model"), "--output_dir", str(out / "runs"), "--run_name", "run", "--max_steps", "2",
             "--batch_size", str(TRAIN_BATCH), "--split_ratio", "0", "--fgd_model", "none"])
    return {"stderr_tail": run_cli(["--merge_weights", "--output_dir", str(out / "runs" / "run")])[0][-300:]}


FAST_PARTS = {
    "caption_fp32": lambda out, args: product_caption(out, True, "off", "fp32"),
    "eager_ceiling": eager_ceiling,
    "caption_merged_eager": lambda out, args: product_caption(out, True, "off", "auto"),
    "caption_merged_compiled_cold": lambda out, args: product_caption(out, True, "on", "auto"),
    "caption_merged_compiled_warm": lambda out, args: product_caption(out, True, "on", "auto"),
    # --caption_precision auto compiles an int8 tower on some CPUs (models/caption_speed.py::int8_pays_under_auto):
    # these rows keep the tower in the compute dtype, for comparison.
    "caption_merged_compiled_dtype_cold": lambda out, args: product_caption(out, True, "on", compute_precision()),
    "caption_merged_compiled_dtype_warm": lambda out, args: product_caption(out, True, "on", compute_precision()),
    "caption_merged_int8": lambda out, args: product_caption(out, True, "off", "int8"),
    "caption_merged_int8_compiled": lambda out, args: product_caption(out, True, "on", "int8"),
    "caption_adapter_eager": lambda out, args: product_caption(out, False, "off", "auto"),
    "caption_adapter_compiled_cold": lambda out, args: product_caption(out, False, "on", "auto"),
    "caption_adapter_compiled_warm": lambda out, args: product_caption(out, False, "on", "auto"),
    "caption_adapter_compiled_dtype_warm": lambda out, args: product_caption(out, False, "on", compute_precision()),
    "fill_fp32": lambda out, args: fill_rate(out, "off", "fp32"),
    "fill_eager": fill_row("off", "auto"),
    "fill_compiled": fill_row("on", "auto"),
    "fill_int8": fill_row("off", "int8"),
    "fill_int8_compiled": fill_row("on", "int8"),
}


def summarise_fast(results: dict) -> dict:
    """Each captioning row's speed against the eager ceiling of the same run, and its agreement with fp32."""
    exact, ceiling = results["caption_fp32"]["captions"], results["eager_ceiling"]["images_per_second"]
    bare = results["eager_ceiling"]["captions"]
    rows = {}
    for name, row in results.items():
        if isinstance(row, dict) and "captions" in row:
            same = sum(row["captions"].get(k) == v for k, v in exact.items())
            rows[name] = {"images_per_second": round(row["images_per_second"], 2), "vs_eager_ceiling": round(row["images_per_second"] / ceiling, 3),
                          "caption_agreement_vs_fp32": same / max(1, len(exact)),
                          # bf16 against bf16: what the fast paths change, apart from bf16 itself
                          "caption_agreement_vs_eager_ceiling": sum(row["captions"].get(k) == v for k, v in bare.items()) / max(1, len(bare)),
                          "load": row.get("load")}
    for name, row in results.items():
        if name.startswith("fill_") and "fill_eager" in results:
            rows[name] = {"images_per_second": round(row["images_per_second"], 2), "load": row.get("load"),
                          "vs_fill_eager": round(row["images_per_second"] / results["fill_eager"]["images_per_second"], 3),
                          "relative_error_vs_fp32": row.get("relative_error_vs_fp32")}
    rows["compile_seconds"] = {f"{name}_first_batch": row["first_batch_seconds"] for name, row in results.items()
                               if name.startswith("caption_") and isinstance(row, dict) and "first_batch_seconds" in row}
    return rows


def run_part(name: str, args) -> dict:
    """One measurement in a fresh process, so neither memory nor warm caches carry over."""
    # Inductor's cache in the output folder, emptied at the start: the first compiled row is cold, the next warm.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(args.output_dir / "inductor_cache")}
    proc = subprocess.run([sys.executable, __file__, "--part", name, "--output_dir", str(args.output_dir),
                           "--train_images", str(args.train_images), "--test_images", str(args.test_images),
                           "--reference_steps", str(args.reference_steps)], capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark part {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


PARTS = {
    "reference_full_finetune": reference_full_finetune,
    "project_train": project_train,
    "project_caption_adapter": lambda out, args: project_caption(out, merged=False),
    "merge": lambda out, args: {"stderr_tail": run_cli(["--merge_weights", "--output_dir", str(out / "runs" / "run")])[0][-300:]},
    "project_caption_merged": lambda out, args: project_caption(out, merged=True),
    "reference_model_card": reference_model_card,
}


def summarise(results: dict) -> dict:
    ref_train, train = results["reference_full_finetune"], results["project_train"]
    card = results["reference_model_card"]["images_per_second"]
    return {
        "train_speedup": ref_train["seconds_per_step"] / train["seconds_per_step"],
        "train_peak_rss_ratio": train["peak_rss_mb"] / ref_train["peak_rss_mb"],
        "caption_adapter_speedup": results["project_caption_adapter"]["images_per_second"] / card,
        "caption_merged_speedup": results["project_caption_merged"]["images_per_second"] / card,
    }


def compare_training(out: Path, args) -> int:
    """--only training: the full fine-tune and --train in alternating processes, --rounds times; each pair's ratios
    (the VM's speed drifts by tens of percent within minutes, so a ratio is only taken within one pair)."""
    pairs = []
    for round_ in range(args.rounds):
        pair = {}
        for name in ("reference_full_finetune", "project_train"):
            shutil.rmtree(out / "runs", ignore_errors=True)
            pair[name] = {**run_part(name, args), "load": load()}
            print(f"round {round_ + 1} {name}: {json.dumps(pair[name])}", file=sys.stderr, flush=True)
        reference, project = pair["reference_full_finetune"], pair["project_train"]
        pair["speed_ratio"] = reference["seconds_per_step"] / project["seconds_per_step"]
        pair["peak_rss_ratio"] = project["peak_rss_mb"] / reference["peak_rss_mb"]
        pairs.append(pair)
    results = {"train_images": args.train_images, "pairs": pairs,
               "speed_ratios": [round(p["speed_ratio"], 2) for p in pairs],
               "peak_rss_ratios": [round(p["peak_rss_ratio"], 3) for p in pairs]}
    (out / "bench_training.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("speed_ratios", "peak_rss_ratios")}))
    return 0


def main() -> int:
    args = parse_args()
    out = args.output_dir.resolve()
    args.output_dir = out
    if args.part:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")
        print(json.dumps({**PARTS, **FAST_PARTS, "quick_run": quick_run}[args.part](out, args)))
        return 0
    import torch

    prepare(out, args)
    if args.only == "training":
        return compare_training(out, args)
    reuse = args.reuse_run and (out / "runs" / "run" / "merged_model").is_dir()
    if not reuse:
        shutil.rmtree(out / "runs", ignore_errors=True)
    shutil.rmtree(out / "inductor_cache", ignore_errors=True)
    results = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
               "train_images": args.train_images, "test_images": args.test_images, "load_at_start": load()}
    parts = list(PARTS) if args.only == "all" else [] if reuse else ["quick_run"]
    rows = [r for r in FAST_PARTS if not args.rows or r in ("caption_fp32", "eager_ceiling") or r in args.rows.split(",")]
    for name in parts + rows:
        start = time.perf_counter()
        results[name] = run_part(name, args)
        shown = {k: v for k, v in results[name].items() if k != "captions"}
        print(f"{name} ({time.perf_counter() - start:.0f} s): {json.dumps(shown)}", file=sys.stderr, flush=True)
    results["ratios"] = summarise(results) if args.only == "all" else {}
    results["past_the_ceiling"] = summarise_fast(results)
    results["load_at_end"] = load()
    (out / "bench_speed.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
