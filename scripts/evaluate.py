"""--eval: caption --test_dir with a run or base model (or read --predictions_file), score it, write the results.

Under torchrun / accelerate launch the images are split over the processes; the main process scores and writes.
With --clip_model, CLIP embeds each image in the same decode pass as captioning (CLIP-S, RefCLIP-S); with
--captions_file none (or a dataset split without captions) only what needs no references is reported.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from models.git_qlora import resolve_device
from scripts.inference import caption_across_ranks, load_caption_model
from scripts.report import VAL_PREDICTIONS_NAME, read_val_predictions, write_eval_report
from utils import distributed
from utils.caption_stats import caption_statistics, collapse_warning, format_caption_stats
from utils.clip_score import compute_clip_scores, embed_image_source, try_load_clip
from utils.confidence import mean_intervals, paired_mean_changes
from utils.dataset_utils import collect_examples, list_images, read_captions_file, read_folder_metadata, warn_names
from utils.errors import UserInputError
from utils.evaluation import METRIC_KEYS, align_names, evaluate_captions, format_metrics_table
from utils.io import read_predictions_file, read_split_names, write_json_atomic, write_predictions_csv
from utils.java_scorers import resolve_caption_tokenizer
from utils.run_lock import lock_folder

logger = logging.getLogger(__name__)

NO_REFERENCES_NOTE = ("No reference captions (--captions_file none, or a --dataset split without captions): BLEU, "
                      "ROUGE, CIDEr-D and FGD need references and are not computed; CLIP-S and the caption "
                      "statistics need none.")


@dataclass
class EvalInputs:
    """What --eval scores: captions, their references ({} without), and the images for CLIP-S."""

    predictions: dict[str, str]
    references: dict[str, list[str]]
    info: dict
    images: object = None  # an image folder or source, for the report's thumbnails and CLIP-S
    image_names: dict[str, str] = field(default_factory=dict)  # prediction name -> name in `images`
    image_embeddings: dict = field(default_factory=dict)  # prediction name -> CLIP embedding, when captioned here


def _names_as_listed(names: list[str], captions_file: Path | None, folder: Path) -> dict[str, str]:
    """Folder-relative image names -> the names the captions file uses ("a.jpg" or "test/a.jpg"),
    so eval_predictions.csv can be rescored against that file unambiguously."""
    listed = set(read_captions_file(captions_file, allow_partial=True)) if captions_file else set()  # its problems were reported when read
    prefixed = {name: f"{folder.name}/{name}" for name in names}
    return {name: prefixed[name] if name not in listed and prefixed[name] in listed else name for name in names}


def _references_of(examples) -> dict[str, list[str]]:
    references: dict[str, list[str]] = {}
    for example in examples:
        references.setdefault(example.image_name, []).append(example.caption)
    return references


def _dataset_images(config) -> tuple[object, list[str], dict[str, list[str]]]:
    """--dataset's --eval_split: (images, names to score, references); a split without captions has no references."""
    from utils.hf_datasets import DatasetSpec, load_eval_split

    split = load_eval_split(DatasetSpec.from_config(config), need_captions=False)
    references = {} if config.reference_free else _references_of(split.examples)
    if not references:
        if not config.reference_free:
            logger.warning("%s has no captions: scoring without references (CLIP-S and caption statistics).", split.images)
        return split.images, split.images.names(), {}
    warn_names(f"Skipped rows of {split.images} without a caption", [n for n in split.images.names() if n not in references])
    return split.images, sorted(references), references


def _images_and_references(config) -> tuple[object, list[str], dict[str, list[str]], str]:
    """(image folder or source, names to caption, references, what they are) of --test_dir or --dataset."""
    if config.dataset is not None:
        images, names, references = _dataset_images(config)
        return images, names, references, str(images)
    folder = Path(config.test_dir)
    if config.reference_free:
        return folder, list_images(folder, "--test_dir"), {}, str(folder)
    if config.captions_file is None and read_folder_metadata(folder) is None:
        logger.warning("--test_dir %s has no captions file: its file names are the references. Pass --captions_file "
                       "none to score without references (CLIP-S and caption statistics) instead.", folder)
    references = _references_of(collect_examples(folder, config.captions_file, "--test_dir", config.allow_partial_captions))
    return folder, sorted(references), references, str(folder)


def _caption_run_images(config, embedder) -> EvalInputs:
    """Caption --test_dir or --dataset with the run's (or --model_name's) model; CLIP embeds the same decoded images."""
    source, names, references, label = _images_and_references(config)
    model, processor, config, description = load_caption_model(config, len(names))
    logger.info("Evaluating %s on %d images of %s%s", description, len(names), label,
                "" if references else " (no references)")
    result = caption_across_ranks(
        model, processor, source, names, config.batch_size, config.generation_tokens, config.num_beams,
        config.num_workers, embed_images=embedder.embed_images if embedder is not None else None,
    )
    listed = {name: name for name in names}
    if config.dataset is None and references:
        listed = _names_as_listed(names, config.captions_file, Path(config.test_dir))
    predictions = {listed[name]: caption for name, caption in result.captions.items()}
    references = {listed[name]: refs for name, refs in references.items()}
    distributed.on_main_process(write_predictions_csv, Path(config.output_dir) / "eval_predictions.csv", predictions,
                                references or None)
    where = {"dataset": config.dataset} if config.dataset is not None else {"test_dir": str(config.test_dir)}
    info = {"model": description, **where, "skipped_images": result.skipped,
            "images_per_second": result.images_per_second, "max_new_tokens": config.generation_tokens,
            "num_beams": config.num_beams}
    if embedder is not None:  # part of the captioning time above (the same pass); this rank's share
        info["clip_image_seconds"] = embedder.seconds
    embeddings = {listed[name]: row for name, row in result.image_embeddings.items()}
    return EvalInputs(predictions, references, info, source, {listed[n]: n for n in result.captions}, embeddings)


def _read_predictions(config) -> EvalInputs:
    """--predictions_file, its references (--captions_file, or the --dataset split's captions), and the images of
    --test_dir or --dataset for CLIP-S."""
    predictions = read_predictions_file(config.predictions_file, config.allow_partial_captions)
    info = {"predictions_file": str(config.predictions_file)}
    images, image_names, references = None, [], {}
    if config.dataset is not None:
        images, image_names, references = _dataset_images(config)
    elif config.test_dir is not None:
        images, image_names = Path(config.test_dir), list_images(Path(config.test_dir), "--test_dir")
    if config.captions_file is not None and not config.reference_free:
        references = read_captions_file(config.captions_file, config.allow_partial_captions)
    if references:
        predictions = align_names(predictions, references)
    # Prediction names may carry the folder ("test/a.jpg") where --test_dir's images are "a.jpg": match by suffix.
    matched = align_names({name: name for name in image_names}, {name: [] for name in predictions})
    return EvalInputs(predictions, references, info, images, {p: i for p, i in matched.items() if p in predictions})


def run_evaluation(config) -> int:
    """--eval: score a run's (or a base model's) captions of --test_dir, or an existing --predictions_file."""
    distributed.on_main_process(Path(config.output_dir).mkdir, parents=True, exist_ok=True)
    lock_folder(config.output_dir, "--output_dir")  # eval_results.json and eval_predictions.csv go there
    # Resolved once, before any captioning: ptb without Java fails in seconds, and auto warns once.
    tokenizer = distributed.run_on_main(lambda: resolve_caption_tokenizer(config.caption_tokenizer, config.java))
    config = config.replace(caption_tokenizer=tokenizer)
    if config.predictions_file is not None:
        inputs = _read_predictions(config)
        return distributed.on_main_process(_score_and_write, config, inputs, None, None) or 0
    embedder, clip_note = try_load_clip(config.clip_model, resolve_device())  # every rank embeds its share
    inputs = _caption_run_images(config, embedder)
    return distributed.on_main_process(_score_and_write, config, inputs, embedder, clip_note) or 0


# ---------------------------------------------------------------------------
# Scoring (main process)
# ---------------------------------------------------------------------------


def _clip_embeddings(config, inputs: EvalInputs, embedder) -> dict:
    """Image embeddings for CLIP-S: the captioning pass's, else one decode pass over --test_dir / --dataset."""
    if inputs.image_embeddings or inputs.images is None or not inputs.image_names:
        return inputs.image_embeddings
    by_image, skipped = embed_image_source(embedder, inputs.images, sorted(set(inputs.image_names.values())),
                                           num_workers=config.num_workers)
    warn_names("CLIP-S: images that could not be read, not scored", sorted(skipped))
    return {pred: by_image[img] for pred, img in inputs.image_names.items() if img in by_image}


def _clip_metrics(config, inputs: EvalInputs, embedder, clip_note, predictions=None) -> tuple[dict, dict]:
    """({"clip_score", "ref_clip_score", "clip_images", "clip_note"}, per-image scores) of predictions (default:
    inputs.predictions); every key present, None with a note when there is no CLIP-S."""
    if embedder is None and clip_note is None:
        embedder, clip_note = try_load_clip(config.clip_model, resolve_device())
    if embedder is not None and inputs.images is None and not inputs.image_embeddings:
        clip_note = "CLIP-S not computed: it needs the images; give --test_dir or --dataset with --predictions_file."
    if clip_note is not None:
        return {"clip_score": None, "ref_clip_score": None, "clip_images": 0, "clip_note": clip_note}, {}
    inputs.image_embeddings = _clip_embeddings(config, inputs, embedder)
    return compute_clip_scores(embedder, inputs.image_embeddings, predictions or inputs.predictions, inputs.references)


def load_training_captions(run_dir: Path) -> tuple[list[str] | None, str | None]:
    """(captions the run trained on, None), or (None, why not): for copied_from_training. Not a run: (None, None)."""
    from utils.config import load_run_config

    if not (Path(run_dir) / "run_config.json").is_file():
        return None, None
    settings = load_run_config(run_dir)
    try:
        if settings.get("dataset"):
            if settings.get("streaming"):
                return None, "the run streamed its training data, which is not read again to compare captions"
            from utils.hf_datasets import DatasetSpec, load_train_and_eval

            train, _ = load_train_and_eval(DatasetSpec.from_run_settings(settings), hold_out=not settings.get("test_dir"))
            return [example.caption for example in train.examples], None
        examples = collect_examples(Path(settings["train_dir"]), settings.get("captions_file"), "--train_dir", allow_partial=True)
        held_out = set(read_split_names(run_dir, settings, "validation")) if settings.get("val_dir") == settings.get("train_dir") else set()
        return [example.caption for example in examples if example.image_name not in held_out], None
    except (UserInputError, OSError, KeyError, TypeError, ValueError) as error:
        return None, f"the run's training captions could not be read again ({str(error).splitlines()[0]})"


def _statistics(predictions: dict[str, str], training_captions, training_note) -> dict:
    stats = caption_statistics(predictions.values(), training_captions)
    if training_note:
        stats["copied_note"] = f"copied_from_training not computed: {training_note}."
    return {"caption_stats": stats, "collapse_warning": collapse_warning(stats)}


def _base_captions(config, predictions: dict[str, str]) -> tuple[dict[str, str] | None, str | None]:
    """(the run's base-model captions of exactly these images, None), or (None, why there are none): the 'before'
    column of RUN/val_predictions.csv, keyed like the predictions."""
    run_dir = Path(config.output_dir)
    if not (run_dir / "run_config.json").is_file():
        return None, "Not a training run: no base-model captions to compare with."
    before = {name: r["before"] for name, r in read_val_predictions(run_dir / VAL_PREDICTIONS_NAME).items() if r["before"]}
    base = align_names(before, {name: [] for name in predictions})
    base = {name: caption for name, caption in base.items() if name in predictions}
    if not predictions or set(base) != set(predictions):
        return None, (f"The run has no base-model captions of these images ({VAL_PREDICTIONS_NAME} holds {len(before)} "
                      f"validation images of training, {len(base)} of the {len(predictions)} evaluated here).")
    return base, None


def _reference_metrics(config, inputs: EvalInputs, base, per_image: dict, base_per_image: dict):
    """(metrics, the base's metrics, paired change, CaptionScores): n-gram metrics, METEOR and FGD with intervals
    when there are references; CLIP-S intervals alone (and their paired change) when there are none."""
    if inputs.references:
        scores = evaluate_captions(inputs.predictions, inputs.references, config.fgd_model, resolve_device(),
                                   caption_tokenizer=config.caption_tokenizer, java=config.java, baseline=base,
                                   extra_per_image=per_image, baseline_extra_per_image=base_per_image or None,
                                   seed=config.seed)
        return {**scores.metrics, "references_note": None}, scores.baseline, scores.change, scores
    if not inputs.predictions:
        raise UserInputError("--eval: there is no caption to score (no image could be read); see the warnings above.")
    metrics = {**{key: None for key in METRIC_KEYS}, "num_images": len(inputs.predictions), "num_references": 0,
               "fgd_note": None, "references_note": NO_REFERENCES_NOTE, "caption_tokenizer": config.caption_tokenizer}
    names = sorted(inputs.predictions)
    complete = {k: [v[n] for n in names] for k, v in per_image.items() if set(names) <= set(v)}
    metrics["confidence"] = mean_intervals(complete, seed=config.seed)
    change = None
    if base_per_image:
        before = {k: [v[n] for n in names] for k, v in base_per_image.items() if set(names) <= set(v)}
        change = paired_mean_changes(before, complete, seed=config.seed) or None
    return metrics, None, change, None


def _score(config, inputs: EvalInputs, embedder, clip_note) -> tuple[dict, object]:
    """Every number of eval_results.json (n-gram metrics null without references, CLIP-S, statistics, the base
    model's captions of the same images with the paired change), and the CaptionScores behind the metrics."""
    clip, per_image = _clip_metrics(config, inputs, embedder, clip_note)
    base, base_note = _base_captions(config, inputs.predictions)
    base_clip, base_per_image = _clip_metrics(config, inputs, embedder, clip_note, base) if base else ({}, {})
    metrics, base_metrics, change, scores = _reference_metrics(config, inputs, base, per_image, base_per_image)
    training = load_training_captions(Path(config.output_dir))  # logs what it reads, like --train did
    results = {**metrics, **clip, **_statistics(inputs.predictions, *training)}
    if base is None:
        results.update(base_model=None, base_model_note=base_note)
    else:
        results.update(base_model={**(base_metrics or {}), **base_clip, **_statistics(base, *training),
                                   "num_images": len(base), "per_image": base_per_image},
                       base_model_note=None, change=change)
    return {**results, "per_image": per_image}, scores


def _table(metrics: dict, with_references: bool) -> dict:
    """What the printed table shows: without references, only the numbers there are (no rows of n/a)."""
    return {k: v for k, v in metrics.items() if k not in ("clip_images", "base_model", "change", "per_image")
            and (with_references or v is not None or k not in METRIC_KEYS)}


def _print_results(results: dict) -> None:
    with_references = bool(results.get("num_references"))
    table = _table(results, with_references)
    print(format_metrics_table(table))
    base = results.get("base_model")
    if base:
        print("\nThe base model's captions of the same images (the run's val_predictions.csv) vs this evaluation:")
        print(format_metrics_table(_table(base, with_references), table, results.get("change")))
    print(format_caption_stats(base["caption_stats"], results["caption_stats"], ("base model", "this evaluation"))
          if base else format_caption_stats(results["caption_stats"]))
    for key in ("references_note", "clip_note", "base_model_note"):
        if results.get(key):
            print(f"note: {results[key]}")
    for label, warning in (("", results["collapse_warning"]), ("base model: ", (base or {}).get("collapse_warning"))):
        if warning:
            logger.warning("%s%s", label, warning)


def _score_and_write(config, inputs: EvalInputs, embedder, clip_note) -> int:
    results, scores = _score(config, inputs, embedder, clip_note)
    inputs.info["captions_file"] = str(config.captions_file) if config.captions_file else None
    inputs.info["clip_model"] = config.clip_model
    inputs.info["caption_tokenizer"] = results["caption_tokenizer"]
    target = Path(config.output_dir) / "eval_results.json"
    write_json_atomic(target, {**results, "settings": inputs.info})
    _print_results(results)
    logger.info("Wrote %s", target)
    # logs a warning if it fails, never raises
    write_eval_report(config, inputs.predictions, inputs.references, results, inputs.info, inputs.images, scores=scores)
    return 0
