"""The one settings object of a run: built once from the command line, validated once, saved with the run."""

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from utils import distributed
from utils.errors import UserInputError

MODES = ("train", "eval", "inference", "merge_weights", "demo")
QUANTIZATION_BITS = (4, 8, 16, 32)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
MERGE_BASES = ("dequantized", "original")
CACHE_SETTINGS = ("auto", "on", "off")
COMPILE_SETTINGS = ("auto", "on", "off")
CAPTION_PRECISIONS = ("auto", "bf16", "fp32", "int8")
CAPTION_PRECISION_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # the --bnb_4bit_compute_dtype they stand for
VISION_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # GIT's CLIP vision tower
MERGE_DTYPES = ("auto", "float32", "float16", "bfloat16")
CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "rouge_1", "rouge_2")
CAPTION_TOKENIZERS = ("auto", "ptb", "simple")
DEFAULT_TARGET_MODULES = ("query", "key", "value", "dense")  # every Linear of GIT's text decoder
# --report_to: the Trainer's integrations offered here, with the package each needs and how to install it.
TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "mlflow": ("mlflow", "pip install mlflow"),
            "wandb": ("wandb", "pip install wandb")}
TUPLE_FIELDS = ("lora_target_modules", "report_to")  # comma-separated on the command line, lists in a --config file
# Settings that define the trained model; later modes take them from the run, not the command line.
# The compute dtype is not among them: it is how the model runs, not what it is (--bnb_4bit_compute_dtype
# float32 gives any run the exact path).
# Config fields that are not flags: the command line sets them through another flag's value.
DERIVED_FIELDS = ("reference_free",)
MODEL_KEYS = (
    "model_name", "quantization_bits", "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "max_length", "trust_remote_code",
)


@dataclass(frozen=True)
class Config:
    """Every setting of one invocation; field names are the command-line flags without dashes."""

    mode: str
    # data
    train_dir: Path | None = None
    test_dir: Path | None = None
    captions_file: Path | None = None
    test_image: Path | None = None
    predictions_file: Path | None = None
    split_ratio: float = 0.1
    max_length: int = 40
    # data from Hugging Face `datasets` (instead of --train_dir / --test_dir)
    dataset: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    id_column: str | None = None
    streaming: bool = False
    shuffle_buffer: int = 1000
    allow_partial_captions: bool = False  # go on when unreadable caption rows cost over 1% of the images
    # model
    model_name: str | None = None
    quantization_bits: int = 4
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "auto"
    bnb_4bit_use_double_quant: bool = True
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # training
    output_dir: Path = Path("results")
    run_name: str | None = None
    batch_size: int = 8
    epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    gradient_accumulation: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 42
    eval_steps: int | None = None
    logging_steps: int = 10
    save_total_limit: int = 2
    metric_for_best_model: str = "loss"
    num_workers: int = 2
    resume: bool = False
    cache_image_features: str = "auto"
    report_to: tuple[str, ...] = ("tensorboard",)
    early_stopping_patience: int = 0  # validations without improvement before stopping; 0: never stop early
    early_stopping_threshold: float = 0.0
    # generation, evaluation, merging
    max_new_tokens: int | None = None  # None: --max_length, so captions can be as long as training allows
    num_beams: int = 1
    use_merged: bool = False
    fgd_model: str | None = "thenlper/gte-small"
    merge_base: str = "dequantized"
    merge_dtype: str = "auto"
    caption_tokenizer: str = "auto"  # ptb (the COCO protocol, needs Java) when Java runs, else simple
    java: str | None = "java"  # the Java executable for PTBTokenizer and METEOR; None: no Java
    # demo
    demo_scale: float = 1.0
    # captioning speed (models/caption_speed.py)
    compile: str = "auto"
    caption_precision: str = "auto"
    clip_model: str | None = "openai/clip-vit-base-patch32"  # None: --clip_model none, no CLIP-S
    # derived (DERIVED_FIELDS): set from another flag's value, not a flag of its own
    reference_free: bool = False  # --captions_file none: --eval scores without references (CLIP-S, caption statistics)

    @property
    def generation_tokens(self) -> int:
        """Longest caption generated: --max_new_tokens, else the (run's) --max_length."""
        return self.max_new_tokens if self.max_new_tokens is not None else self.max_length

    @property
    def caption_config(self) -> "Config":
        """The settings captioning loads its model with: --caption_precision bf16/fp32 is that compute dtype."""
        wanted = CAPTION_PRECISION_DTYPES.get(self.caption_precision)
        return self.replace(bnb_4bit_compute_dtype=wanted) if wanted else self

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_json_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return out


def _check_range(problems, flag, value, low, high=math.inf, low_open=False):
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
        problems.append(f"{flag} must be {bound}; got {value}.")


def _check_choice(problems, flag, value, choices):
    if value not in choices:
        problems.append(f"{flag} must be one of {', '.join(map(str, choices))}; got {value!r}.")


def _check_numbers(config: Config, problems: list[str]) -> None:
    _check_range(problems, "--split_ratio", config.split_ratio, 0.0, 0.9)
    _check_range(problems, "--max_length", config.max_length, 2)
    _check_range(problems, "--lora_r", config.lora_r, 1)
    _check_range(problems, "--lora_alpha", config.lora_alpha, 0, low_open=True)
    _check_range(problems, "--lora_dropout", config.lora_dropout, 0.0, 0.99)
    _check_range(problems, "--batch_size", config.batch_size, 1)
    _check_range(problems, "--epochs", config.epochs, 0, low_open=True)
    _check_range(problems, "--learning_rate", config.learning_rate, 0, 1.0, low_open=True)
    _check_range(problems, "--gradient_accumulation", config.gradient_accumulation, 1)
    _check_range(problems, "--warmup_ratio", config.warmup_ratio, 0.0, 0.99)
    _check_range(problems, "--weight_decay", config.weight_decay, 0.0)
    _check_range(problems, "--logging_steps", config.logging_steps, 1)
    _check_range(problems, "--save_total_limit", config.save_total_limit, 1)
    _check_range(problems, "--num_workers", config.num_workers, 0)
    _check_range(problems, "--num_beams", config.num_beams, 1)
    _check_range(problems, "--demo_scale", config.demo_scale, 0.0, 1.0, low_open=True)
    if config.max_new_tokens is not None:
        _check_range(problems, "--max_new_tokens", config.max_new_tokens, 1)
    if config.eval_steps is not None:
        _check_range(problems, "--eval_steps", config.eval_steps, 1)
    if config.max_steps != -1:
        _check_range(problems, "--max_steps", config.max_steps, 1)


def _check_choices(config: Config, problems: list[str]) -> None:
    _check_choice(problems, "--quantization_bits", config.quantization_bits, QUANTIZATION_BITS)
    _check_choice(problems, "--bnb_4bit_quant_type", config.bnb_4bit_quant_type, QUANT_TYPES)
    _check_choice(problems, "--bnb_4bit_compute_dtype", config.bnb_4bit_compute_dtype, COMPUTE_DTYPES)
    _check_choice(problems, "--merge_base", config.merge_base, MERGE_BASES)
    _check_choice(problems, "--merge_dtype", config.merge_dtype, MERGE_DTYPES)
    _check_choice(problems, "--metric_for_best_model", config.metric_for_best_model, ("loss",) + CAPTION_METRICS)
    _check_choice(problems, "--cache_image_features", config.cache_image_features, CACHE_SETTINGS)
    _check_choice(problems, "--caption_tokenizer", config.caption_tokenizer, CAPTION_TOKENIZERS)
    if config.caption_tokenizer == "ptb" and config.java is None:
        problems.append("--caption_tokenizer ptb runs the PTBTokenizer in Java, but --java is none; give --java or use simple.")
    _check_choice(problems, "--compile", config.compile, COMPILE_SETTINGS)
    _check_choice(problems, "--caption_precision", config.caption_precision, CAPTION_PRECISIONS)
    wanted = CAPTION_PRECISION_DTYPES.get(config.caption_precision)
    if wanted and config.bnb_4bit_compute_dtype not in ("auto", wanted):
        problems.append(
            f"--caption_precision {config.caption_precision} captions in {wanted}, but --bnb_4bit_compute_dtype asks for "
            f"{config.bnb_4bit_compute_dtype}; give one of them (or the same precision in both)."
        )
    vision = [name for name in config.lora_target_modules if name in VISION_TARGET_MODULES]
    if config.cache_image_features == "on" and vision:
        problems.append(
            f"--cache_image_features on needs a frozen vision tower, but --lora_target_modules adapts it ({','.join(vision)}). "
            "Drop those names or use --cache_image_features auto/off."
        )
    if not config.lora_target_modules:
        problems.append("--lora_target_modules is empty; give comma-separated module names such as query,key,value,dense.")
    if config.run_name is not None and (not config.run_name or "/" in config.run_name or config.run_name in (".", "..")):
        problems.append(f"--run_name must be a plain folder name; got {config.run_name!r}.")


def _check_mode_inputs(config: Config, problems: list[str]) -> None:
    if config.mode == "train" and config.train_dir is None and config.dataset is None:
        problems.append(
            "--train requires --train_dir (a folder of training images) or --dataset (a hub dataset id, "
            "a parquet/arrow/JSONL file or folder, or a glob of WebDataset .tar shards)."
        )
    if config.train_dir is not None and config.dataset is not None:
        problems.append("--train_dir and --dataset are two sources of training images; give one of them.")
    if config.mode == "inference" and sum(x is not None for x in (config.test_dir, config.test_image, config.dataset)) != 1:
        problems.append(
            "--inference needs exactly one of --test_dir (a folder of images), --test_image (one image) "
            "or --dataset (captions --eval_split)."
        )
    if config.mode == "eval" and config.predictions_file is None and config.test_dir is None and config.dataset is None:
        problems.append(
            "--eval needs --test_dir (images to caption and score) or --predictions_file (captions to score), "
            "plus --captions_file with the reference captions; or --dataset (its --eval_split's images and captions)."
        )
    if config.mode == "eval" and config.test_dir is not None and config.dataset is not None:
        problems.append("--eval scores --test_dir or --dataset; give one of them.")
    if config.mode == "eval" and config.predictions_file is not None and config.captions_file is None \
            and config.dataset is None and not config.reference_free:
        problems.append("--eval --predictions_file needs --captions_file, the reference captions to score against "
                        "(or --captions_file none to score without references: CLIP-S with --test_dir, caption statistics).")
    if config.reference_free and config.mode != "eval":
        problems.append("--captions_file none (no references) only applies to --eval; give a captions file or leave the flag out.")


def _check_dataset_flags(config: Config, problems: list[str]) -> None:
    if config.dataset is None:
        given = [f"--{k}" for k in ("dataset_config", "eval_split", "image_column", "caption_column", "id_column")
                 if getattr(config, k) is not None] + (["--streaming"] if config.streaming else [])
        if given:
            problems.append(f"{', '.join(given)} only apply with --dataset; add --dataset or leave them out.")
        return
    if config.captions_file is not None and config.test_dir is None:
        problems.append("--captions_file is for folders; with --dataset the captions come from --caption_column.")
    if config.streaming and config.mode != "train":
        problems.append("--streaming applies to --train; --eval and --inference read --eval_split (downloaded once, then cached).")
    if config.streaming and config.mode == "train" and config.max_steps == -1:
        problems.append(
            "--streaming needs --max_steps: a streamed dataset has no known length, so epochs cannot be counted."
        )
    _check_range(problems, "--shuffle_buffer", config.shuffle_buffer, 0)


def _check_launch(config: Config, problems: list[str]) -> None:
    """What --resume means per mode, and which modes run on several processes (torchrun / accelerate launch)."""
    if config.resume and not (config.mode == "train" or (config.mode == "inference" and config.test_dir is not None)):
        problems.append(
            "--resume continues --train (from the newest checkpoint) or --inference --test_dir (captioning only the "
            f"images an interrupted job left); it has no meaning for --{config.mode}"
            f"{' --test_image' if config.test_image is not None else ''}. Leave it out."
        )
    single = config.mode in ("merge_weights", "demo") or (config.mode == "inference" and config.test_image is not None)
    if single and distributed.is_distributed():
        what = "--inference --test_image" if config.mode == "inference" else f"--{config.mode}"
        problems.append(
            f"{what} runs in one process, but this was launched with {distributed.world_size()} processes. "
            "Run it with plain `python git_qlora_main.py ...`; only --train, --inference --test_dir and --eval use several."
        )


def output_paths(config: Config) -> list[tuple[str, Path, str]]:
    """(flag, path, "folder" or "file") of everything this command writes, by mode."""
    if config.mode == "inference" and config.test_image is not None:
        return []  # the caption goes to stdout
    if config.mode == "inference":
        if config.predictions_file is not None:
            return [("--predictions_file", Path(config.predictions_file), "file")]
        return [("--output_dir", Path(config.output_dir) / "captions.csv", "file")]
    return [("--output_dir", Path(config.output_dir), "folder")]  # --train: the runs' parent; the others: the run


def _check_outputs(config: Config, problems: list[str]) -> None:
    from utils.io import unwritable_reason

    for flag, path, kind in output_paths(config):
        reason = unwritable_reason(path, kind)
        if reason:
            problems.append(f"{flag} {path}: cannot write there: {reason}. Give a {kind} you can write to.")


def _check_training_extras(config: Config, problems: list[str]) -> None:
    """--report_to (its optional packages checked now, before anything loads) and --early_stopping_patience."""
    import importlib.util

    unknown = [name for name in config.report_to if name not in TRACKERS and name != "none"]
    if unknown:
        problems.append(f"--report_to takes {', '.join(TRACKERS)} or none (comma-separated); got {','.join(unknown)}.")
    elif "none" in config.report_to and len(config.report_to) > 1:
        problems.append(f"--report_to none means no tracker; it cannot be combined ({','.join(config.report_to)}).")
    if config.mode == "train":
        for name in config.report_to:
            package, install = TRACKERS.get(name, (None, None))
            if package is not None and importlib.util.find_spec(package) is None:
                problems.append(f"--report_to {name} needs the {package} package, which is not installed: run `{install}` "
                                "(or pip install -r requirements-extras.txt), or leave it out of --report_to.")
    local_store = not os.environ.get("MLFLOW_TRACKING_URI")
    if config.mode == "train" and "mlflow" in config.report_to and local_store and importlib.util.find_spec("mlflow") \
            and importlib.util.find_spec("sqlalchemy") is None:
        problems.append("--report_to mlflow: the installed mlflow-skinny cannot keep runs in MLflow's default local store "
                        "(sqlite); run `pip install mlflow`, or set MLFLOW_TRACKING_URI to your tracking server.")
    _check_range(problems, "--early_stopping_patience", config.early_stopping_patience, 0)
    _check_range(problems, "--early_stopping_threshold", config.early_stopping_threshold, 0.0)
    no_validation = config.test_dir is None and config.split_ratio == 0 and config.dataset is None
    if config.early_stopping_patience and config.mode == "train" and no_validation:
        problems.append("--early_stopping_patience watches the validation metric, but --split_ratio 0 and no --test_dir "
                        "leave no validation images; give --test_dir or a --split_ratio above 0, or leave it at 0.")


def validate(config: Config) -> Config:
    """Raise one UserInputError that lists every problem found, each naming its flag."""
    problems: list[str] = []
    _check_mode_inputs(config, problems)
    _check_dataset_flags(config, problems)
    _check_launch(config, problems)
    _check_numbers(config, problems)
    _check_choices(config, problems)
    _check_outputs(config, problems)
    _check_training_extras(config, problems)
    if problems:
        raise UserInputError("Invalid settings:\n  - " + "\n  - ".join(problems))
    return config


def find_runs(folder: Path) -> list[Path]:
    """Run folders (holding run_config.json) directly under folder, newest first."""
    runs = [p.parent for p in Path(folder).glob("*/run_config.json")]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def load_run_config(run_dir: Path) -> dict:
    """The settings a training run saved; the error names --train, which writes them."""
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        raise UserInputError(
            f"{run_dir} is not a training run: {path.name} is missing. Give --output_dir the run folder that "
            "`git_qlora_main.py --train` printed (OUTPUT_DIR/RUN_NAME), or --model_name to use a base model alone."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserInputError(f"Cannot read {path}: {error}. Re-run --train or restore the file.") from None


def apply_run_settings(config: Config, run_settings: dict) -> Config:
    """Take the model-defining settings from a saved run so the user never repeats them."""
    changes = {}
    for key in MODEL_KEYS:
        if key in run_settings:
            value = run_settings[key]
            changes[key] = tuple(value) if key == "lora_target_modules" else value
    return config.replace(**changes)
