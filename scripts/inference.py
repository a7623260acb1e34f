"""Caption images with a trained run (adapter or merged model) or a plain base model, and merge adapters."""

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from peft import PeftModel
from transformers import AutoModelForCausalLM

from models.git_qlora import (
    DTYPES, describe_precision, load_adapter_model, load_base_model, load_processor, resolve_base_dtype,
    resolve_compute_dtype, resolve_device,
)
from models.greedy_decoding import can_decode_greedily, greedy_caption_ids
from scripts.report import read_json
from utils import distributed
from utils.config import Config, apply_run_settings, find_runs, load_run_config
from utils.dataset_utils import ImageItems, as_image_source, list_images, load_image
from utils.errors import UserInputError
from utils.io import (
    CaptionPartWriter, caption_parts_dir, read_caption_parts, read_split_names, replace_folder_atomically,
    write_json_atomic, write_predictions_csv, write_text_atomic,
)
from utils.model_card import build_model_card
from utils.progress import progress as progress_bar
from utils.run_lock import lock_folder, lock_output_file
from utils.text import tidy_caption
from utils.workers import data_loader

logger = logging.getLogger(__name__)


@dataclass
class CaptionResult:
    captions: dict[str, str] = field(default_factory=dict)  # image name -> caption
    skipped: dict[str, str] = field(default_factory=dict)  # image name -> why
    seconds: float = 0.0
    image_embeddings: dict = field(default_factory=dict)  # image name -> embed_images' row (e.g. CLIP, for CLIP-S)

    @property
    def images_per_second(self) -> float:
        return len(self.captions) / self.seconds if self.seconds > 0 else 0.0


def _keep_lists(batch):
    return batch


def floating_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype pixel values must have: that of the first floating-point weight (4-bit weights are uint8)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


@torch.no_grad()
def generate_captions(model, processor, images, max_new_tokens: int = 30, num_beams: int = 1) -> list[str]:
    """Greedy (or beam) captions for PIL images, as the GIT model card does it, tidied to read like text."""
    pixel_values = processor(images=images, return_tensors="pt").pixel_values
    return caption_pixel_values(model, processor, pixel_values, max_new_tokens, num_beams)


@torch.no_grad()
def caption_pixel_values(model, processor, pixel_values, max_new_tokens: int = 30, num_beams: int = 1) -> list[str]:
    """Captions for preprocessed images (or cached image features, see models/vision_cache.py)."""
    device = next(model.parameters()).device
    pixel_values = pixel_values.to(device=device, dtype=floating_dtype(model))
    if can_decode_greedily(model, pixel_values, num_beams):  # generate's result without its per-token overhead
        ids = greedy_caption_ids(model, pixel_values, max_new_tokens)
    else:
        ids = model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
    return [tidy_caption(text) for text in processor.batch_decode(ids, skip_special_tokens=True)]


def caption_folder(
    model, processor, folder, names: list[str] | None, batch_size: int = 8, max_new_tokens: int = 30,
    num_beams: int = 1, num_workers: int = 0, progress: bool = True,
    on_batch: Callable[[dict[str, str], dict[str, str]], None] | None = None, progress_desc: str = "Captioning",
    embed_images: Callable[[list], list] | None = None,
) -> CaptionResult:
    """Caption the named images in batches; memory stays flat however many there are.

    `folder` is an image folder, an image source with load(name) (rows of a `datasets` split), or a torch
    Dataset of (name, image or None, reason) items, for which `names` may be None.

    on_batch(captions, skipped) is called as each batch finishes (e.g. to append it to a part file).
    embed_images(images) -> one row per image is given each batch's decoded images, so a scorer that needs them
    (CLIP-S) reads every image in this one decode pass; its rows land in result.image_embeddings.
    """
    result = CaptionResult()
    if isinstance(folder, Dataset):
        items = folder
    else:  # a folder or e.g. rows of a `datasets` split
        images = as_image_source(folder)
        items = ImageItems([(name, images, name) for name in names])
    loader = data_loader(items, batch_size=batch_size, num_workers=num_workers, collate_fn=_keep_lists)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total = len(names) if names is not None else None
    with progress_bar(total=total, desc=progress_desc, logger=logger, disable=not progress) as bar:
        for batch in loader:
            good = [(name, image) for name, image, _ in batch if image is not None]
            skipped = {name: reason for name, image, reason in batch if image is None}
            captions = {}
            if good:
                texts = generate_captions(model, processor, [image for _, image in good], max_new_tokens, num_beams)
                captions = {name: caption for (name, _), caption in zip(good, texts)}
                if embed_images is not None:
                    result.image_embeddings.update(zip(captions, embed_images([image for _, image in good])))
            result.captions.update(captions)
            result.skipped.update(skipped)
            if on_batch is not None:
                on_batch(captions, skipped)
            bar.update(len(batch))
    result.seconds = time.perf_counter() - start
    model.train(was_training)
    return result


def caption_across_ranks(
    model, processor, folder: Path, names: list[str], batch_size: int = 8, max_new_tokens: int = 30,
    num_beams: int = 1, num_workers: int = 0, progress: bool = True, progress_desc: str = "Captioning",
    embed_images: Callable[[list], list] | None = None,
) -> CaptionResult:
    """caption_folder with the names split over the launched processes (call it on every rank); every rank
    gets all captions (and image embeddings). seconds is the slowest rank's. One process: caption_folder itself."""
    mine = caption_folder(
        model, processor, folder, distributed.split_for_rank(names), batch_size, max_new_tokens, num_beams,
        num_workers, progress=progress and distributed.is_main_process(), progress_desc=progress_desc,
        embed_images=embed_images,
    )
    result = CaptionResult()
    parts = distributed.all_gather_object((mine.captions, mine.skipped, mine.seconds, mine.image_embeddings))
    for captions, skipped, seconds, embeddings in parts:
        result.captions.update(captions)
        result.skipped.update(skipped)
        result.seconds = max(result.seconds, seconds)
        result.image_embeddings.update(embeddings)
    return result


def require_run(run_dir: Path) -> dict:
    """The run's saved settings; a folder of runs or a non-run gets an error saying what to pass."""
    run_dir = Path(run_dir)
    if not (run_dir / "run_config.json").is_file():
        runs = find_runs(run_dir) if run_dir.is_dir() else []
        if runs:
            listing = ", ".join(str(p) for p in runs[:10])
            raise UserInputError(
                f"--output_dir {run_dir} is a folder of runs, not a run. Pass one run folder, "
                f"e.g. --output_dir {runs[0]}. Runs found there, newest first: {listing}."
            )
    return load_run_config(run_dir)


def _require_folder(path: Path, what: str, command: str) -> Path:
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise UserInputError(f"{path} is missing: the run has no {what}. Create it with `git_qlora_main.py {command}`.")
    return path


def load_caption_model(config: Config, images: int = 0):
    """(model, processor, config, description) for captioning `images` images: a run's adapter or merged model, or
    --model_name; its vision tower compiled / int8 as --compile and --caption_precision say (models/caption_speed.py)."""
    from models.caption_speed import speed_up_vision_tower

    model, processor, config, description = _load_model_for_captions(config.caption_config)
    share = -(-images // distributed.world_size())  # each rank captions its share
    tokens = config.generation_tokens if config.num_beams == 1 else 0  # the decoder's step compiles for greedy captions
    faster = speed_up_vision_tower(model, config.compile, config.caption_precision, resolve_device(), share, config.batch_size, tokens,
                                   int8_where_it_pays=True)
    return model, processor, config, f"{description}{', ' + faster if faster else ''}"


def _load_model_for_captions(config: Config):
    device = resolve_device()
    run_file = Path(config.output_dir) / "run_config.json"
    if config.model_name is not None and not run_file.is_file():
        model = load_base_model(config, device)
        description = f"base model {config.model_name} ({describe_precision(config, device, training=False)})"
        return model.eval(), load_processor(config.model_name, config.trust_remote_code), config, description
    config = apply_run_settings(config, require_run(config.output_dir))
    run_dir = Path(config.output_dir)
    if config.use_merged:
        folder = _require_folder(run_dir / "merged_model", "merged_model", "--merge_weights --output_dir RUN")
        # bf16 where the hardware has it (about 3x fp32 on AVX-512 BF16 CPUs), fp16 on older GPUs, else fp32.
        dtype = resolve_compute_dtype(config, device)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=distributed.device_map(device)).eval()
        return model, load_processor(str(folder)), config, f"merged model {folder} ({floating_dtype(model)} on {device})"
    folder = _require_folder(run_dir / "final_model", "final_model (training did not finish; continue it with --resume)", "--train")
    model = load_adapter_model(config, folder, device)
    description = f"{config.model_name} + adapter {folder} ({describe_precision(config, device, training=False)})"
    return model, load_processor(str(folder)), config, description


def caption_one_image(config: Config, model, processor) -> int:
    image, reason = load_image(Path(config.test_image))
    if image is None:
        raise UserInputError(f"--test_image {config.test_image} cannot be used: {reason}. Give a readable image file.")
    caption = generate_captions(model, processor, [image], config.generation_tokens, config.num_beams)[0]
    print(caption, flush=True)  # stdout carries the caption alone, for `caption=$(...)`
    return 0


def images_to_caption(config: Config) -> tuple[object, list[str], str]:
    """(image folder or source, image names, what they are) for --test_dir or --dataset's --eval_split."""
    if config.dataset is not None:
        from utils.hf_datasets import DatasetSpec, load_eval_split

        split = load_eval_split(DatasetSpec.from_config(config), need_captions=False)
        return split.images, split.images.names(), f"--dataset {config.dataset} ({split.images})"
    return Path(config.test_dir), list_images(Path(config.test_dir), "--test_dir"), f"--test_dir {config.test_dir}"


def plan_captioning(names: list[str], parts: Path, resume: bool, job: dict) -> list[str]:
    """The images still to caption: all of them, or with --resume those no part file holds yet.

    job (model and generation settings) is kept in PARTS/job.json: a resumed job must use the same ones,
    so one CSV never mixes captions of two models.
    """
    done, skipped = read_caption_parts(parts) if parts.is_dir() else ({}, {})
    if (done or skipped) and not resume:
        raise UserInputError(
            f"An interrupted captioning job left {len(done)} captions in {parts}. Add --resume to caption only "
            f"the remaining images and write the complete file, or delete {parts} to start over."
        )
    job_file = parts / "job.json"
    if resume and job_file.is_file():
        before = json.loads(job_file.read_text(encoding="utf-8"))
        changed = sorted(k for k in job if before.get(k) != job[k])
        if changed:
            raise UserInputError(
                f"--resume: the interrupted job in {parts} used other settings ({', '.join(f'{k}: {before.get(k)!r} now {job[k]!r}' for k in changed)}). "
                f"Resume with the same model, images, --max_new_tokens and --num_beams, or delete {parts} to start over."
            )
    if resume:
        logger.info("--resume: %d of %d images already done in %s", len(done) + len(skipped), len(names), parts)
    write_json_atomic(job_file, job)
    return [name for name in names if name not in done and name not in skipped]


def assemble_captions(target: Path, parts: Path, label: str) -> None:
    """Write the one sorted CSV from every rank's part file, then remove the parts (main process, at the end)."""
    captions, skipped = read_caption_parts(parts)
    skipped = {name: reason for name, reason in skipped.items() if name not in captions}
    for name, reason in sorted(skipped.items()):
        logger.warning("Skipped %s: %s", name, reason)
    if captions:
        write_predictions_csv(target, captions)  # rows sorted by image name
    shutil.rmtree(parts)
    if not captions:
        raise UserInputError(f"{label}: none of the {len(skipped)} images could be read; see the warnings.")
    logger.info("Wrote %s: %d captions, %d images skipped", target, len(captions), len(skipped))


def caption_directory(config: Config, model, processor, images: tuple | None = None, description: str = "") -> int:
    """Caption --test_dir or --dataset, split over the launched processes. Each rank appends its captions to its
    own part file batch by batch; --resume skips what the parts hold; the main process assembles the CSV once."""
    source, names, label = images or images_to_caption(config)
    target = Path(config.predictions_file or Path(config.output_dir) / "captions.csv")
    parts = caption_parts_dir(target)
    where = str(Path(config.test_dir).resolve()) if config.dataset is None else label
    job = {"model": description, "images": where, "max_new_tokens": config.generation_tokens, "num_beams": config.num_beams}
    todo = distributed.run_on_main(lambda: plan_captioning(names, parts, config.resume, job))
    with CaptionPartWriter(parts, distributed.rank()) as part:
        result = caption_folder(
            model, processor, source, distributed.split_for_rank(todo), config.batch_size, config.generation_tokens,
            config.num_beams, config.num_workers, progress=distributed.is_main_process(), on_batch=part.append,
        )
    # Gathering the counts also waits for every rank to finish its part file before the main process reads them.
    counts = distributed.all_gather_object((len(result.captions), len(result.skipped), result.seconds))
    captioned, skipped, seconds = sum(c[0] for c in counts), sum(c[1] for c in counts), max(c[2] for c in counts)
    logger.info("Captioned %d images (%d skipped) in %.1f s on %d process(es), %.2f images/s",
                captioned, skipped, seconds, len(counts), captioned / seconds if seconds > 0 else 0.0)
    distributed.run_on_main(lambda: assemble_captions(target, parts, label))
    return 0


def lock_caption_target(config: Config) -> None:
    """One captioning job per output (utils/run_lock.py): the run folder when the captions go into a run,
    else the captions file itself; taken before the model loads and before the part files are read."""
    run_dir = Path(config.output_dir)
    target = Path(config.predictions_file or run_dir / "captions.csv")
    if (run_dir / "run_config.json").is_file() and target.parent.resolve() == run_dir.resolve():
        lock_folder(run_dir, "The run folder")
    else:
        lock_output_file(target, "--predictions_file" if config.predictions_file else "--output_dir")


def run_inference(config: Config) -> int:
    """--inference: caption --test_image (stdout) or every image of --test_dir (a CSV)."""
    # A bad dataset or folder fails before the model loads.
    images = images_to_caption(config) if config.test_image is None else None
    if config.test_image is None:
        lock_caption_target(config)
    model, processor, config, description = load_caption_model(config, len(images[1]) if images else 1)
    logger.info("Captioning with %s", description)
    if config.test_image is not None:
        return caption_one_image(config, model, processor)
    return caption_directory(config, model, processor, images, description)


def resolve_merge_dtype(config: Config, device: str) -> torch.dtype:
    if config.merge_dtype != "auto":
        return DTYPES[config.merge_dtype]
    return resolve_base_dtype(config, device) if device == "cuda" else torch.float32


def build_merged_model(config: Config, adapter_dir: Path, device: str):
    """Base (dequantized 4/8-bit weights by default, or the full-precision original) + adapter, merged."""
    quantized = config.quantization_bits in (4, 8)
    if config.merge_base == "dequantized" and quantized:
        base = load_base_model(config, device).dequantize(dtype=torch.float32)
    else:
        base = load_base_model(config, device, quantize=False)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, key):
            delattr(merged.config, key)
    return merged.eval()


def sample_images(config: Config, run_settings: dict, limit: int = 16) -> tuple[object, list[str]]:
    """Images for the fidelity check: the run's validation images, else the first training images."""
    run_settings = {**run_settings, "val_images": read_split_names(config.output_dir, run_settings, "validation")}
    if run_settings.get("dataset"):
        from utils.hf_datasets import sample_dataset_images

        return sample_dataset_images(run_settings, limit)
    if run_settings.get("val_dir") and run_settings["val_images"]:
        folder = Path(run_settings["val_dir"])
        names = [n for n in run_settings["val_images"] if (folder / n).is_file()]
        if names:
            return folder, names[:limit]
    if not run_settings.get("train_dir"):
        return None, []
    folder = Path(run_settings["train_dir"])
    return folder, (list_images(folder, "--train_dir") if folder.is_dir() else [])[:limit]


@torch.no_grad()
def compare_models(reference, candidate, processor, images: list) -> dict:
    """Caption agreement and largest logit difference of candidate against reference on the same images."""
    ref_caps = generate_captions(reference, processor, images)
    new_caps = generate_captions(candidate, processor, images)
    texts = processor.tokenizer(ref_caps, padding=True, return_tensors="pt")
    pixels = processor(images=images, return_tensors="pt").pixel_values

    def logits(model):
        device = next(model.parameters()).device
        return model(
            pixel_values=pixels.to(device, floating_dtype(model)), input_ids=texts.input_ids.to(device),
            attention_mask=texts.attention_mask.to(device),
        ).logits.float().cpu()

    ref_logits, new_logits = logits(reference), logits(candidate)
    n_image = ref_logits.shape[1] - texts.input_ids.shape[1]
    mask = texts.attention_mask.bool()
    diff = (ref_logits[:, n_image:] - new_logits[:, n_image:]).abs()[mask]  # text positions only
    agree = sum(a == b for a, b in zip(ref_caps, new_caps))
    return {
        "images": len(images), "caption_agreement": agree / len(images),
        "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
        "samples": [{"adapter": a, "merged": b} for a, b in zip(ref_caps, new_caps)],
    }


def precision_agreement(config: Config, merged, processor, images: list, reference: list[str]) -> dict:
    """Agreement with the fp32 adapter's captions of the merged model as --use_merged captions with it: in the
    captioning dtype, and with an int8 vision tower when --caption_precision int8 asks for it (absent where it
    cannot run). Each is a copy of the merged model, so only the precisions in use are measured."""
    import copy

    from models.caption_speed import speed_up_vision_tower

    device, result = resolve_device(), {}
    dtype = resolve_compute_dtype(config.caption_config, device)
    for precision in ("auto", "int8") if config.caption_precision == "int8" else ("auto",):
        model = copy.deepcopy(merged).to(dtype)
        if precision == "int8" and not speed_up_vision_tower(model, "off", "int8", device, len(images), len(images)):
            continue
        captions = generate_captions(model, processor, images)
        same = sum(a == b for a, b in zip(reference, captions))
        result[precision] = {"caption_agreement": same / len(images), "images": len(images), "dtype": str(dtype).replace("torch.", "")}
        del model
    return result


def merge_weights(config: Config) -> int:
    """--merge_weights: write RUN/merged_model (plain transformers) and RUN/merge_report.json."""
    run_settings = require_run(config.output_dir)
    lock_folder(config.output_dir, "The run folder")
    config = apply_run_settings(config, run_settings)
    run_dir, device = Path(config.output_dir), resolve_device()
    adapter_dir = _require_folder(run_dir / "final_model", "final_model", "--train")
    processor = load_processor(str(adapter_dir))
    dtype = resolve_merge_dtype(config, device)
    logger.info("Merging %s into the %s base of %s, saving as %s", adapter_dir, config.merge_base, config.model_name, dtype)
    merged = build_merged_model(config, adapter_dir, device).to(dtype)
    report = {"merge_base": config.merge_base, "merge_dtype": str(dtype).replace("torch.", ""), "base_model": config.model_name}
    folder, names = sample_images(config, run_settings)
    images = [img for img in (as_image_source(folder).load(n)[0] for n in names) if img is not None]
    if images:
        # The reference computes in fp32, so the report measures the merge, not bf16 rounding of the 4-bit kernels.
        adapter_model = load_adapter_model(config.replace(bnb_4bit_compute_dtype="float32"), adapter_dir, device)
        report.update(compare_models(adapter_model, merged, processor, images))
        del adapter_model
        report["precisions_vs_fp32"] = precision_agreement(config, merged, processor, images, [s["adapter"] for s in report["samples"]])
        logger.info("Merge fidelity on %d images: captions agree %.0f%%, max |logit diff| %.4g",
                    report["images"], 100 * report["caption_agreement"], report["max_abs_logit_diff"])
    tmp = run_dir / ".merged_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    processor.save_pretrained(str(tmp))
    write_text_atomic(tmp / "README.md", build_model_card(run_settings, read_json(run_dir / "metrics.json") or None, str(run_dir), report))
    replace_folder_atomically(tmp, run_dir / "merged_model")
    write_json_atomic(run_dir / "merge_report.json", report)
    logger.info("Wrote %s and %s", run_dir / "merged_model", run_dir / "merge_report.json")
    return 0
