"""--eval: caption --test_dir with a run or base model (or read --predictions_file), score it, write the results.

Under torchrun / accelerate launch the images are split over the processes; the main process scores and writes.
"""

import logging
from pathlib import Path

from models.git_qlora import resolve_device
from scripts.inference import caption_across_ranks, load_caption_model
from scripts.report import write_eval_report
from utils import distributed
from utils.dataset_utils import Example, collect_examples, read_captions_file
from utils.evaluation import align_names, format_metrics_table, score_captions
from utils.io import read_predictions_file, write_json_atomic, write_predictions_csv

logger = logging.getLogger(__name__)


def _names_as_listed(names: list[str], captions_file: Path | None, folder: Path) -> dict[str, str]:
    """Folder-relative image names -> the names the captions file uses ("a.jpg" or "test/a.jpg"),
    so eval_predictions.csv can be rescored against that file unambiguously."""
    listed = set(read_captions_file(captions_file)) if captions_file else set()
    prefixed = {name: f"{folder.name}/{name}" for name in names}
    return {name: prefixed[name] if name not in listed and prefixed[name] in listed else name for name in names}


def _images_and_references(config) -> tuple[object, list[Example], str]:
    """(image folder or source, examples, what they are): --test_dir + --captions_file, or --dataset's --eval_split."""
    if config.dataset is not None:
        from utils.hf_datasets import DatasetSpec, load_eval_split

        split = load_eval_split(DatasetSpec.from_config(config))
        return split.images, split.examples, str(split.images)
    examples = collect_examples(Path(config.test_dir), config.captions_file, flag="--test_dir")
    return Path(config.test_dir), examples, str(config.test_dir)


def _caption_run_images(config) -> tuple[dict[str, str], dict[str, list[str]], dict, object]:
    """Caption --test_dir or --dataset with the run's (or --model_name's) model; references from the captions."""
    source, examples, label = _images_and_references(config)
    references: dict[str, list[str]] = {}
    for example in examples:
        references.setdefault(example.image_name, []).append(example.caption)
    model, processor, config, description = load_caption_model(config, len(references))
    logger.info("Evaluating %s on %d images of %s", description, len(references), label)
    result = caption_across_ranks(
        model, processor, source, sorted(references), config.batch_size, config.generation_tokens,
        config.num_beams, config.num_workers,
    )
    if config.dataset is None:
        listed = _names_as_listed(list(references), config.captions_file, Path(config.test_dir))
        predictions = {listed[name]: caption for name, caption in result.captions.items()}
        references = {listed[name]: refs for name, refs in references.items()}
    else:
        predictions = dict(result.captions)
    distributed.on_main_process(write_predictions_csv, Path(config.output_dir) / "eval_predictions.csv", predictions, references)
    where = {"dataset": config.dataset} if config.dataset is not None else {"test_dir": str(config.test_dir)}
    info = {"model": description, **where, "skipped_images": result.skipped,
            "images_per_second": result.images_per_second, "max_new_tokens": config.generation_tokens,
            "num_beams": config.num_beams}
    return predictions, references, info, source


def run_evaluation(config) -> int:
    """--eval: score a run's (or a base model's) captions of --test_dir, or an existing --predictions_file."""
    if config.predictions_file is not None:
        references = read_captions_file(config.captions_file)
        predictions = align_names(read_predictions_file(config.predictions_file), references)
        info, images = {"predictions_file": str(config.predictions_file)}, None
    else:
        predictions, references, info, images = _caption_run_images(config)
    return distributed.on_main_process(_score_and_write, config, predictions, references, info, images) or 0


def _score_and_write(config, predictions: dict[str, str], references: dict[str, list[str]], info: dict, images=None) -> int:
    metrics = score_captions(predictions, references, config.fgd_model, resolve_device())
    info["captions_file"] = str(config.captions_file) if config.captions_file else None
    target = Path(config.output_dir) / "eval_results.json"
    write_json_atomic(target, {**metrics, "settings": info})
    print(format_metrics_table(metrics))
    logger.info("Wrote %s", target)
    write_eval_report(config, predictions, references, metrics, info, images)  # logs a warning if it fails, never raises
    return 0
