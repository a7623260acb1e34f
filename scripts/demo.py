"""--demo: generate a captioned dataset, get a base GIT, then run --eval, --train, --eval, --inference, --merge_weights on it."""

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if "torch" not in sys.modules:  # only takes effect before torch (and its OpenMP runtime) loads
    # OpenMP threads spin ~300,000 times before sleeping. On 2 cores shared with one other busy process
    # that made each pretraining step ~100x slower (3.5 s instead of 30 ms); a short spin costs ~10% alone.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from models.small_git import PretrainSettings, SmallGitSize, build_small_git, pretrain_small_git
from utils import demo_data
from utils.config import Config, validate
from utils.errors import UserInputError
from utils.io import read_predictions_file

logger = logging.getLogger(__name__)

FP32_CAPTIONS = "captions_fp32.csv"  # the exact path's captions of the test pictures, beside captions.csv
INT8_CAPTIONS = "captions_int8.csv"  # --caption_precision int8's captions of them, to measure its agreement

# What a demo folder holds; a rerun replaces these and nothing else.
DEMO_ENTRIES = ("data", "base_model", "eval_before", "run", "demo_report.json")


# The stand-in's pretraining: few steps at a high rate, positions coded over the 4 x 4 grid (temperature 4).
DEMO_PRETRAINING = PretrainSettings(steps=600, learning_rate=2e-3, warmup_steps=50, position_temperature=4.0)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and steps of the demo at full scale; `scaled` shrinks the counts for a quick check."""

    train_images: int = 300  # user-style training pictures (3 captions each), 5 per scene
    test_images: int = 60  # held-out pictures: each of the 60 scenes once
    image_size: int = 64  # pixels, as the small GIT sees them
    # A fresh small GIT's decoder attends evenly over the 17 image tokens at GitConfig's 0.02-scale weights, so it
    # could tell colours (the whole picture's) long before it could say where the shape is: positions were at chance
    # after 600 pretraining steps and at ~50% after 3,000. Weights at 0.1 and no dropout: 98-100% after 600
    # (74-92% after 400), and the colour right on all. Shapes are the hard part: 60-75% after 600.
    initializer_range: float = 0.1
    dropout: float = 0.0
    pretrain_images: int = 4000  # base-style pictures, in memory, for pretraining the small GIT (10,000: no better)
    pretrain: PretrainSettings = DEMO_PRETRAINING  # frozen, so one shared default is safe
    # QLoRA optimizer steps (~4.4 passes) and peak rate. Since --seed decides LoRA's initial weights (3 December;
    # before, each run drew them afresh), over seeds 1, 7, 42, 123 at 250 steps of 16: at 3e-3 BLEU-4 after
    # 0.86-0.92 and the fast path's captions equal to the fp32 path's on 97-100% of the test pictures; at 4e-3
    # BLEU-4 0.85-0.92 but only 93-98% equal (93% at the default seed); at 2e-3 (seeds 1, 7, 42) 0.90-0.94 and
    # 95-100%. A higher rate leaves the adapter's choices less decided, so bf16 and fp32 break more of them
    # differently. Since the evening of 3 December 125 steps of 32 (the same pictures seen) at 3e-3: over the
    # same seeds BLEU-4 after 0.88-0.90 and bf16 == fp32 captions on 95-98%, where 250 steps of 16 gave 0.86-0.90
    # and 95-100% on the same host (an AVX2 CPU, bf16 emulated), in 7.1-8.1 s of steps instead of 11.3-12.5 s
    # (alternating): each step dequantizes the 4-bit base twice whatever the batch, and the model is too small
    # for the batch to fill the cores. On 4 December, on an AVX-512 BF16 host (bf16 native), over seeds 1, 2, 3, 5,
    # 7, 11, 42, 123 at 125 steps of 32: bf16 == fp32 on 95-98.3% (mean 97.1%) and int8 == fp32 on 95-98.3% at
    # 2.5e-3; 95-98.3% (mean 96.5%) and int8 93.3-100% at 3e-3; 90-98.3% (mean 94.6%) at 2e-3; 250 steps of 16 at
    # 3e-3 93.3-100% (mean 97.5%). BLEU-4 after 0.87-0.93 at each. One picture is 1.7%: the rates differ by about
    # one flip per seed, and 2.5e-3 is the one whose every run met 95% on both fast paths.
    train_steps: int = 125
    batch_size: int = 32
    learning_rate: float = 2.5e-3
    # With --model_name (git-base-sized, meant for a GPU): not tuned, the hub is offline here; batches of 16 so
    # a modest GPU holds them.
    hub_train_steps: int = 250
    hub_batch_size: int = 16
    hub_learning_rate: float = 5e-4
    lora_r: int = 16
    lora_alpha: int = 32
    # LoRA stays on the text decoder (the CLI's default targets): adding the vision tower's layers gained
    # ~0.03 BLEU-4 for 40% more training time; the decoder reads the image tokens through these layers too.
    max_new_tokens: int = 16  # the longest demo caption is 11 tokens

    def model_size(self) -> SmallGitSize:
        return SmallGitSize(image_size=self.image_size, initializer_range=self.initializer_range, dropout=self.dropout)

    def scaled(self, scale: float) -> "DemoPlan":
        def shrink(n: int, least: int) -> int:
            return max(least, round(n * scale))

        pretrain = replace(self.pretrain, steps=shrink(self.pretrain.steps, 20),
                           warmup_steps=shrink(self.pretrain.warmup_steps, 2))
        return replace(
            self, train_images=shrink(self.train_images, 8), test_images=shrink(self.test_images, 4),
            pretrain_images=shrink(self.pretrain_images, 32), pretrain=pretrain,
            train_steps=shrink(self.train_steps, 4), hub_train_steps=shrink(self.hub_train_steps, 4),
        )

    def qlora_schedule(self, hub_model: bool) -> tuple[int, int, float]:
        """(optimizer steps, batch size, peak learning rate) of the demo's --train, for its own model or --model_name."""
        if hub_model:
            return self.hub_train_steps, self.hub_batch_size, self.hub_learning_rate
        return self.train_steps, self.batch_size, self.learning_rate


class StageTimer:
    """Seconds per named stage, logged as each one ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, description: str):
        logger.info("=== Demo stage %d: %s ===", len(self.seconds) + 1, description)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        logger.info("=== %s done in %.1f s ===", name, self.seconds[name])


def prepare_demo_dir(output_dir: Path) -> None:
    """Reuse a previous demo's folder (its entries are replaced); never touch a folder holding anything else."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in DEMO_ENTRIES)
        if foreign:
            raise UserInputError(
                f"--output_dir {output_dir} already holds files the demo did not write ({', '.join(foreign[:5])}). "
                "Give an empty or new folder, or the folder of an earlier demo."
            )
        for name in DEMO_ENTRIES:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def demo_fgd_model(config: Config) -> str | None:
    """The FGD encoder: offline only a local folder can load, so the default hub encoder is skipped."""
    if config.fgd_model is None or config.model_name is not None or Path(config.fgd_model).is_dir():
        return config.fgd_model
    logger.info("FGD is skipped in the offline demo: %s is not a local folder (give --fgd_model DIR to include it).", config.fgd_model)
    return None


def demo_clip_model(config: Config) -> str | None:
    """The CLIP model for CLIP-S: like the FGD encoder, only a local folder is used in the offline demo."""
    if config.clip_model is None or config.model_name is not None or Path(config.clip_model).is_dir():
        return config.clip_model
    logger.info("CLIP-S is skipped in the offline demo: %s is not a local folder (give --clip_model DIR to include it).", config.clip_model)
    return None


def build_base_model(folder: Path, plan: DemoPlan, seed: int) -> dict:
    """A small GIT with a tokenizer over the demo's words, pretrained on base-style captions of fresh pictures."""
    build_small_git(folder, demo_data.every_caption(), plan.model_size(), seed=seed)
    # A seed apart from the dataset's, so pretraining never sees the demo's test pictures.
    examples = demo_data.generate_base_examples(plan.pretrain_images, seed=seed + 1_000_003, size=plan.image_size)
    settings = PretrainSettings(**{**asdict(plan.pretrain), "seed": seed})
    return pretrain_small_git(folder, examples, settings)


def base_model_key(plan: DemoPlan, seed: int) -> dict:
    """Everything that decides the pretrained stand-in: sizes, data, steps, seed, vocabulary, code, library versions."""
    import torch
    import transformers

    import models.small_git

    code = hashlib.sha256()
    for module in (models.small_git, demo_data):  # the model builder, the pretraining loop and the pictures
        code.update(Path(module.__file__).read_bytes())
    return {
        "size": asdict(plan.model_size()), "pretrain_images": plan.pretrain_images,
        "pretrain": {**asdict(plan.pretrain), "seed": seed},
        "vocabulary": hashlib.sha256("\n".join(demo_data.every_caption()).encode()).hexdigest()[:16],
        "code": code.hexdigest()[:16], "torch": torch.__version__, "transformers": transformers.__version__,
    }


def obtain_base_model(folder: Path, plan: DemoPlan, seed: int) -> dict:
    """The pretrained stand-in in folder: copied from the user cache when an intact copy of the same key is
    there, else built, pretrained and then kept in the cache for the next --demo."""
    from utils.user_cache import read_cached_folder, store_folder, user_cache_dir

    key = base_model_key(plan, seed)
    entry = user_cache_dir("demo_base_model", hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20])
    manifest = read_cached_folder(entry) if entry.is_dir() else None
    if manifest is not None:
        shutil.copytree(entry, folder, ignore=shutil.ignore_patterns("cache_manifest.json"))
        logger.info("Reused the pretrained base model from the user cache %s (delete it to pretrain again).", entry)
        return {**manifest["pretraining"], "cached_copy": str(entry)}
    stats = build_base_model(folder, plan, seed)
    if store_folder(folder, entry, {"key": key, "pretraining": stats}):
        logger.info("Kept the pretrained base model in the user cache %s; the next --demo reuses it.", entry)
    return {**stats, "cached_copy": None}


def log_hub_model_choice(model_name: str) -> None:
    from models.git_qlora import resolve_device

    logger.info("Using --model_name %s as the base model; no pretraining.", model_name)
    if resolve_device() == "cpu":
        logger.warning("A git-base-sized model trains at ~18 s per step of 4 images on two CPU cores; "
                       "on a CPU the demo is meant for its own small model (leave out --model_name).")


def mode_config(config: Config, **values) -> Config:
    """A Config for one real mode, as the command line would build it, carrying the demo's shared settings."""
    # Worker processes cost more to start than decoding a few hundred 64 px PNGs takes.
    shared = {"seed": config.seed, "fgd_model": config.fgd_model, "clip_model": config.clip_model, "num_workers": 0,
              "bnb_4bit_compute_dtype": config.bnb_4bit_compute_dtype, "java": config.java,
              "caption_tokenizer": config.caption_tokenizer, "compile": config.compile}
    return validate(Config(**{**shared, **values}))


def run_mode_or_fail(function, config: Config) -> None:
    code = function(config)
    if code != 0:
        raise RuntimeError(f"The demo's --{config.mode} step failed with exit code {code}; see the log above.")


def read_metrics(path: Path) -> dict:
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    metrics = results.get("metrics", results)
    return {key: value for key, value in metrics.items() if key != "settings"}


def distinct_captions(predictions: dict[str, str]) -> int:
    return len({" ".join(caption.lower().split()) for caption in predictions.values()})


def sample_captions(before: dict[str, str], after: dict[str, str], captions_file: Path, count: int = 6) -> list[dict]:
    from utils.dataset_utils import read_captions_file

    references = read_captions_file(captions_file)
    names = sorted(set(before) & set(after))
    step = max(1, len(names) // count)  # spread over the test set rather than the first few files
    return [{"image": name, "before": before[name], "after": after[name], "references": references.get(name, [])}
            for name in names[::step][:count]]


# The bar the full-scale demo must clear on its held-out test pictures.
TARGETS = {"bleu_4_after": 0.5, "cider_gain": 1.0, "distinct_captions_after": 5}


def check_targets(before: dict, after: dict, distinct_after: int) -> dict:
    values = {"bleu_4_after": after.get("bleu_4") or 0.0,
              "cider_gain": (after.get("cider") or 0.0) - (before.get("cider") or 0.0),
              "distinct_captions_after": distinct_after}
    return {name: {"value": values[name], "target": bar, "met": values[name] >= bar} for name, bar in TARGETS.items()}


def build_report(out: Path, plan: DemoPlan, base: str, pretraining: dict | None, seconds: dict, fast_path: str) -> dict:
    run = out / "run"
    before, after = read_metrics(out / "eval_before" / "eval_results.json"), read_metrics(run / "eval_results.json")
    before_caps = read_predictions_file(out / "eval_before" / "eval_predictions.csv")
    after_caps = read_predictions_file(run / "eval_predictions.csv")
    distinct = {"before": distinct_captions(before_caps), "after": distinct_captions(after_caps), "test_images": len(after_caps)}
    merge = json.loads((run / "merge_report.json").read_text(encoding="utf-8"))
    fast, exact = read_predictions_file(run / "captions.csv"), read_predictions_file(run / FP32_CAPTIONS)
    agree = sum(fast.get(name) == caption for name, caption in exact.items()) / max(1, len(exact))
    return {
        "fast_vs_fp32": {"caption_agreement": agree, "images": len(exact), "fast_path": fast_path},
        "precisions_vs_fp32": precision_agreement(run, exact, fast_path),
        "before": before,
        "after": after,
        "seconds": {**seconds, "total": round(sum(seconds.values()), 2)},
        "samples": sample_captions(before_caps, after_caps, out / "data" / "captions.csv"),
        "distinct_captions": distinct,
        "targets": check_targets(before, after, distinct["after"]),  # set for the full scale
        "base_model": base,
        "pretraining": pretraining,
        "merge": {k: merge.get(k) for k in ("merge_base", "caption_agreement", "max_abs_logit_diff", "images")},
        "plan": asdict(plan),
        "paths": {"data": str(out / "data"), "base_model": str(out / "base_model") if pretraining else None,
                  "run": str(run), "merged_model": str(run / "merged_model"), "captions": str(run / "captions.csv")},
    }


def precision_agreement(run: Path, exact: dict[str, str], fast_path: str) -> dict:
    """Each captioning precision the demo ran, with its captions' agreement with the fp32 path's."""
    rows = {"auto": ("captions.csv", fast_path), "int8": (INT8_CAPTIONS, "--caption_precision int8")}
    result = {}
    for name, (file, how) in rows.items():
        if (run / file).is_file():
            captions = read_predictions_file(run / file)
            same = sum(captions.get(k) == v for k, v in exact.items())
            result[name] = {"caption_agreement": same / max(1, len(exact)), "images": len(exact), "how": how}
    return result


def captioning_precision(config: Config) -> str:
    """How --inference ran in the demo: the compute dtype --bnb_4bit_compute_dtype resolved to here."""
    from models.git_qlora import resolve_compute_dtype, resolve_device

    device = resolve_device()
    dtype = str(resolve_compute_dtype(config.replace(quantization_bits=4), device)).replace("torch.", "")
    return f"--bnb_4bit_compute_dtype {config.bnb_4bit_compute_dtype}: {dtype} on {device}"


def format_report(report: dict) -> str:
    from utils.evaluation import format_metrics_table

    lines = ["", "Demo: base model before vs after QLoRA fine-tuning, on the held-out test pictures",
             format_metrics_table(report["before"], report["after"], change=report["after"].get("change")), "",
             "distinct captions: {before} before, {after} after, of {test_images} pictures".format(**report["distinct_captions"]), "",
             "seconds per stage:"]
    lines += [f"  {name:<14} {seconds:8.1f}" for name, seconds in report["seconds"].items()]
    lines += ["", "captions of the fast path ({fast_path}) equal to the fp32 path's: {caption_agreement:.0%} of {images}".format(**report["fast_vs_fp32"])]
    if "int8" in report.get("precisions_vs_fp32", {}):
        lines += ["captions with an int8 vision tower equal to the fp32 path's: {caption_agreement:.0%} of {images}".format(**report["precisions_vs_fp32"]["int8"])]
    lines += ["", "samples (before -> after | a reference):"]
    lines += [f"  {s['image']}: {s['before']!r} -> {s['after']!r} | {s['references'][:1]}" for s in report["samples"]]
    return "\n".join(lines)


def prepare_inputs(config: Config, plan: DemoPlan, out: Path, timer: StageTimer) -> tuple[str, dict | None]:
    """Stages 1-2: the user-style dataset, then the base model (built and pretrained, or --model_name)."""
    data = out / "data"
    with timer.stage("data", f"{plan.train_images} training and {plan.test_images} test pictures in {data}"):
        demo_data.write_demo_dataset(data, plan.train_images, plan.test_images, seed=config.seed, size=plan.image_size)
    with timer.stage("base_model", "base model"):
        if config.model_name is not None:
            log_hub_model_choice(config.model_name)
            return config.model_name, None
        return str(out / "base_model"), obtain_base_model(out / "base_model", plan, config.seed)


def run_modes(config: Config, plan: DemoPlan, out: Path, base: str, timer: StageTimer) -> None:
    """Stages 3-7, each through the function its command-line flag calls."""
    from models.caption_speed import int8_unavailable
    from models.git_qlora import resolve_device
    from scripts.inference import merge_weights, run_inference
    from scripts.trainer import train
    from scripts.evaluate import run_evaluation

    data, run = out / "data", out / "run"
    test = {"test_dir": data / "test", "captions_file": data / "captions.csv", "max_new_tokens": plan.max_new_tokens,
            "batch_size": 32}
    # "Before" is the 4-bit base: the very model the adapter is trained on and added to.
    with timer.stage("eval_before", f"--eval of the base model {base}"):
        run_mode_or_fail(run_evaluation, mode_config(config, mode="eval", model_name=base, output_dir=out / "eval_before", **test))
    steps, batch_size, learning_rate = plan.qlora_schedule(hub_model=config.model_name is not None)
    # The demo's own 128-wide model trains faster in fp32 (0.030 vs 0.037 s per step here): its matrices are
    # too small for bf16 to pay for the casts. A git-base-sized --model_name keeps auto (bf16 where native).
    small_model_dtype = "float32" if config.model_name is None and config.bnb_4bit_compute_dtype == "auto" else None
    train_config = mode_config(
        config, mode="train", train_dir=data / "train", model_name=base, output_dir=out, run_name=run.name,
        quantization_bits=4, lora_r=plan.lora_r, lora_alpha=plan.lora_alpha, max_steps=steps,
        eval_steps=steps, learning_rate=learning_rate, logging_steps=max(1, steps // 10),
        save_total_limit=1, **{**test, "batch_size": batch_size},
        **({"bnb_4bit_compute_dtype": small_model_dtype} if small_model_dtype else {}),
    )
    with timer.stage("train", f"--train: QLoRA on a 4-bit NF4 base, {steps} steps of {batch_size}"):
        run_mode_or_fail(train, train_config)
    with timer.stage("eval_after", f"--eval of the run {run}"):
        run_mode_or_fail(run_evaluation, mode_config(config, mode="eval", output_dir=run, **test))
    with timer.stage("inference", f"--inference on {data / 'test'}"):
        run_mode_or_fail(run_inference, mode_config(config, mode="inference", output_dir=run, **test))
    # The same captions on the exact path, to show the fast (bf16 where native) path says the same things.
    with timer.stage("inference_fp32", "--inference --bnb_4bit_compute_dtype float32 (the exact path)"):
        run_mode_or_fail(run_inference, mode_config(config, mode="inference", output_dir=run, **test,
                                                    bnb_4bit_compute_dtype="float32", predictions_file=run / FP32_CAPTIONS))
    int8_missing = int8_unavailable(resolve_device())
    if int8_missing is not None:  # its fallback is the eager tower: its captions would say nothing about int8
        logger.info("The int8 stage is left out: %s.", int8_missing)
    else:
        with timer.stage("inference_int8", "--inference --caption_precision int8 (torchao int8 vision tower)"):
            run_mode_or_fail(run_inference, mode_config(config, mode="inference", output_dir=run, **test,
                                                        caption_precision="int8", predictions_file=run / INT8_CAPTIONS))
    with timer.stage("merge", "--merge_weights"):
        run_mode_or_fail(merge_weights, mode_config(config, mode="merge_weights", output_dir=run))


def run_demo(config: Config, plan: DemoPlan | None = None) -> int:
    """--demo: dataset, base model, then --eval, --train, --eval, --inference, --merge_weights; OUTPUT_DIR/demo_report.json."""
    from utils.io import write_json_atomic

    plan = (plan or DemoPlan()).scaled(config.demo_scale)
    config = config.replace(fgd_model=demo_fgd_model(config), clip_model=demo_clip_model(config))
    out, timer = Path(config.output_dir), StageTimer()
    logger.info("Demo in %s (scale %g, seed %d): %s", out.resolve(), config.demo_scale, config.seed, json.dumps(asdict(plan)))
    prepare_demo_dir(out)
    base, pretraining = prepare_inputs(config, plan, out, timer)
    run_modes(config, plan, out, base, timer)
    report = build_report(out, plan, base, pretraining, timer.seconds, captioning_precision(config))
    report.update(demo_scale=config.demo_scale, seed=config.seed,
                  targets_apply=config.demo_scale == 1.0 and config.model_name is None)
    write_json_atomic(out / "demo_report.json", report)
    print(format_report(report), flush=True)
    missed = [name for name, target in report["targets"].items() if not target["met"]]
    if missed and report["targets_apply"]:
        logger.warning("The demo missed its targets: %s (see demo_report.json)", ", ".join(missed))
    logger.info("Wrote %s", out / "demo_report.json")
    return 0
