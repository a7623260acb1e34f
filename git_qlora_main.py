"""GIT-QLoRA command line: --train, --eval, --inference, --merge_weights or --demo on a GIT captioning model."""

import argparse
import gc
import glob
import logging
import os
import sys
import warnings
from pathlib import Path

# Before torch loads: OpenMP threads that spin while waiting make every op ~100x slower when another
# process shares the cores (seen on 2-core machines); a short spin keeps idle speed.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def leave_triton_unloaded_without_a_gpu() -> None:
    """torch._dynamo (which transformers, PEFT and bitsandbytes import) imports triton to ask whether it is
    there; triton only generates GPU code (torch.compile on the CPU writes C++), and loading it costs 84 MB
    of resident memory and 1.3 s here. On a Linux machine with no GPU device node, torch is told it is absent,
    as on a CPU-only torch build. GIT_QLORA_KEEP_TRITON=1 keeps it."""
    if (sys.platform.startswith("linux") and "triton" not in sys.modules and not os.environ.get("GIT_QLORA_KEEP_TRITON")
            and not any(glob.glob(pattern) for pattern in ("/dev/nvidia*", "/dev/kfd", "/dev/dri/renderD*", "/dev/accel*"))):
        sys.modules["triton"] = None  # `import triton` raises ImportError; importlib.util.find_spec returns None
        # Their warnings that triton is missing would then be this line's doing, about GPU kernels only.
        for name in ("torchao.kernel.intmm", "torch.utils.flop_counter"):
            logging.getLogger(name).setLevel(logging.ERROR)


leave_triton_unloaded_without_a_gpu()


def leave_datasets_unloaded() -> None:
    """transformers' Trainer imports `datasets` (and with it pandas and pyarrow) whenever it is installed: 97 MB
    of resident memory in a git-base-sized --train of a folder (peak 1543 -> 1446 MB), which never uses it. Only
    --dataset reads through it, so for folders and caption files the libraries are told it is absent, as when it
    is not installed. transformers decides once, so this only acts before transformers is imported (not when
    main() runs inside a process that imported it already). GIT_QLORA_KEEP_DATASETS=1 keeps it."""
    if "transformers" not in sys.modules and "datasets" not in sys.modules and not os.environ.get("GIT_QLORA_KEEP_DATASETS"):
        sys.modules["datasets"] = None  # `import datasets` raises ImportError; importlib.util.find_spec returns None


def return_freed_memory_to_the_os() -> None:
    """glibc keeps freed tensor buffers of up to 32 MB in its heap for reuse; training held ~1 GB of them
    (git-base-sized model, CPU). Buffers over 4 MB then go to mmap and back to the OS when freed, at no
    measured cost in step time."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 4 * 2**20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
            pass

from utils import distributed  # noqa: E402
from utils.config import TUPLE_FIELDS, Config, validate  # noqa: E402
from utils.config_file import apply_config_file, explicit_flags, parser_defaults  # noqa: E402
from utils.errors import UserInputError  # noqa: E402

logger = logging.getLogger("git_qlora")


def _modes(parser: argparse.ArgumentParser) -> None:
    # Not required by argparse: the mode may come from --config; main() checks that one was given.
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--train", action="store_const", dest="mode", const="train", help="fine-tune LoRA adapters on --train_dir")
    group.add_argument("--eval", action="store_const", dest="mode", const="eval", help="score captions (of a run, a base model, or --predictions_file)")
    group.add_argument("--inference", action="store_const", dest="mode", const="inference", help="caption --test_dir or --test_image")
    group.add_argument("--merge_weights", action="store_const", dest="mode", const="merge_weights", help="merge the run's adapter into RUN/merged_model")
    group.add_argument("--demo", action="store_const", dest="mode", const="demo", help="offline end-to-end demo on generated images")


def _data_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--train_dir", type=Path, help="folder of training images (searched recursively)")
    g.add_argument("--test_dir", type=Path, help="folder of validation/test images")
    g.add_argument("--captions_file", type=Path, help="CSV image_name,caption (several rows per image allowed); default: metadata.csv/jsonl in the folder, else file names")
    g.add_argument("--test_image", type=Path, help="one image to caption (--inference); the caption goes to stdout")
    g.add_argument("--predictions_file", type=Path, help="--inference: where to write captions (default RUN/captions.csv); --eval: captions to score")
    g.add_argument("--split_ratio", type=float, help="share of training images held out for validation when there is no --test_dir")
    g.add_argument("--max_length", type=int, help="caption length in tokens; longer captions are truncated")
    g.add_argument("--allow_partial_captions", action="store_true", help="go on when unreadable caption rows (or empty --dataset captions) cost over 1%% of the images; by default that stops the run")
    d = parser.add_argument_group("data from Hugging Face datasets (instead of --train_dir / --test_dir)")
    d.add_argument("--dataset", help="hub dataset id, local folder or file of parquet/arrow/JSONL, or a glob of WebDataset .tar shards ('shards/*.tar')")
    d.add_argument("--dataset_config", help="the dataset's configuration name (hub datasets with several)")
    d.add_argument("--train_split", help="split to train on")
    d.add_argument("--eval_split", help="split for validation, --eval and --inference (default: validation or test if present, else a --split_ratio hold-out of --train_split)")
    d.add_argument("--image_column", help="column holding the image: Image feature, {bytes, path}, raw bytes or a path (default: image, jpg, png, webp, ...)")
    d.add_argument("--caption_column", help="column holding the caption; a list is several references (default: text, caption, captions, txt, sentences, json)")
    d.add_argument("--id_column", help="column naming each image in captions.csv and eval_predictions.csv (default: WebDataset __key__, else SPLIT/row number)")
    d.add_argument("--streaming", action="store_true", help="--train reads the dataset as it goes, without downloading it all (needs --max_steps)")
    d.add_argument("--shuffle_buffer", type=int, help="--streaming: examples held for shuffling (0 or 1: stream order)")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model_name", help="hub id or local folder of a GIT checkpoint (training default: microsoft/git-base)")
    g.add_argument("--quantization_bits", type=int, help="4 (NF4 QLoRA), 8, 16 (bf16 base) or 32 (fp32 base)")
    g.add_argument("--bnb_4bit_quant_type", help="nf4 or fp4")
    g.add_argument("--bnb_4bit_compute_dtype", help="auto: bfloat16 where the hardware has it (GPUs with native bf16; CPUs with AVX-512 BF16 or AMX), float16 on older GPUs, float32 on other CPUs; or float32 (the exact path), bfloat16, float16")
    g.add_argument("--bnb_4bit_use_double_quant", action=argparse.BooleanOptionalAction, help="quantize the quantization constants too")
    g.add_argument("--lora_r", type=int, help="LoRA rank")
    g.add_argument("--lora_alpha", type=float, help="LoRA scaling numerator (scale = alpha / r)")
    g.add_argument("--lora_dropout", type=float, help="dropout on the LoRA input (0: none; drawing its masks was a third of a CPU training step)")
    g.add_argument("--lora_target_modules", help="comma-separated Linear layer names to adapt")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in the backward pass to save memory")
    g.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub")


def _training_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=Path, help="--train: parent of the run folder (default: results; --demo: results/demo); other modes: the run folder")
    g.add_argument("--run_name", help="run folder name under --output_dir (default: a timestamp)")
    g.add_argument("--batch_size", type=int, help="images per step (training, captioning)")
    g.add_argument("--epochs", type=float, help="passes over the training images")
    g.add_argument("--max_steps", type=int, help="optimizer steps; overrides --epochs")
    g.add_argument("--learning_rate", type=float, help="peak learning rate (linear decay)")
    g.add_argument("--gradient_accumulation", type=int, help="batches per optimizer step")
    g.add_argument("--warmup_ratio", type=float, help="share of steps with linear warm-up")
    g.add_argument("--weight_decay", type=float, help="AdamW weight decay")
    g.add_argument("--seed", type=int, help="seed for the split, initialisation and data order")
    g.add_argument("--eval_steps", type=int, help="validate and checkpoint every N steps (default: once per epoch)")
    g.add_argument("--logging_steps", type=int, help="log the training loss every N steps")
    g.add_argument("--save_total_limit", type=int, help="checkpoints kept (the best one is always kept)")
    g.add_argument("--metric_for_best_model", help="what picks the best checkpoint and drives --early_stopping_patience: loss (validation loss) or a caption metric such as cider, bleu_4, meteor")
    g.add_argument("--num_workers", type=int, help="image-decoding worker processes")
    g.add_argument("--resume", action="store_true", help="--train: continue the run (--run_name, default the newest) from its last checkpoint; --inference --test_dir: caption only the images an interrupted job left")
    g.add_argument("--cache_image_features", help="auto (on when the vision tower is frozen and the cache fits), on or off: encode each image once and train on the cached features")
    g.add_argument("--report_to", help="where training logs go, comma-separated: tensorboard (RUN/logs), mlflow, wandb, or none (mlflow and wandb: pip install -r requirements-extras.txt)")
    g.add_argument("--early_stopping_patience", type=int, help="stop after N validations in a row without --metric_for_best_model improving (0: never stop early)")
    g.add_argument("--early_stopping_threshold", type=float, help="smallest change of --metric_for_best_model that counts as an improvement")


def _generation_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("captioning, evaluation, merging")
    g.add_argument("--max_new_tokens", type=int, help="longest caption generated, in tokens (default: the run's --max_length)")
    g.add_argument("--num_beams", type=int, help="beam search width (1 = greedy)")
    g.add_argument("--use_merged", action="store_true", help="caption with RUN/merged_model instead of base + adapter")
    g.add_argument("--fgd_model", help="sentence encoder for Fréchet GTE Distance (hub id or folder); 'none' skips it")
    g.add_argument("--merge_base", help="dequantized (the 4-bit weights the adapter was trained on) or original (full precision)")
    g.add_argument("--merge_dtype", help="auto (float32 on the CPU, the training dtype on a GPU), float32, float16, bfloat16")
    g.add_argument("--demo_scale", type=float, help="shrink the demo (0..1] for a quick check")
    g.add_argument("--clip_model", help="CLIP model for CLIPScore / RefCLIPScore in --eval (hub id or folder); 'none' skips it")
    g.add_argument("--caption_tokenizer", help="how captions are tokenized for scoring: ptb (Stanford PTBTokenizer, the COCO protocol; needs Java), simple (lowercase, ASCII punctuation removed) or auto (ptb when Java runs)")
    g.add_argument("--java", help="Java executable for the PTBTokenizer and METEOR; 'none' scores without Java (simple tokenizer, no METEOR)")
    g.add_argument("--compile", help="captioning and feature caching: torch.compile the vision tower: on, off, or auto (when the job is large enough that compiling, ~40 s once per machine on a CPU, pays; the log says why). Failures fall back to eager")
    g.add_argument("--caption_precision", help="captioning and feature caching: auto (the compute dtype --bnb_4bit_compute_dtype resolves to: bf16 where native, else fp32; for captions whose vision tower is compiled, an int8 tower on CPUs with AVX-512 VNNI and no AMX when torchao is installed), bf16, fp32 (the exact path; shorthand for that --bnb_4bit_compute_dtype), or int8 (torchao int8 vision tower on top of the compute dtype; needs torchao and VNNI on CPUs)")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """argparse's "(default: ...)" after every flag's help, except where the help already says what an unset
    flag means (e.g. "--eval_steps ... (default: once per epoch)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default is argparse.SUPPRESS or action.dest == "mode":
            return text
        if action.default is None and "default" in text:
            return text
        return f"{text} (default: %(default)s)"

    def _split_lines(self, text, width):
        # Hub ids and flag values hold hyphens ("openai/clip-vit-base-patch32"): never break a line inside one.
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    """Every flag's default is its Config field's default (utils/config.py): a new flag is a Config field plus an
    add_argument call without default=."""
    parser = argparse.ArgumentParser(
        prog="git_qlora_main.py",
        description="Fine-tune Microsoft GIT captioning models with QLoRA, caption, merge and evaluate.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML or JSON file of settings, keys as the flags without dashes "
                        "(lora_r: 16); a RUN/run_config.json reruns that run. Flags on the command line override it")
    for add in (_modes, _data_flags, _model_flags, _training_flags, _generation_flags):
        add(parser)
    parser.set_defaults(**parser_defaults(parser))
    return parser


def build_config(args: argparse.Namespace) -> Config:
    return validate(unchecked_config(args))


def unchecked_config(args: argparse.Namespace) -> Config:
    """The parsed flags as a Config, normalised ("none", comma lists, mode defaults) but not yet validated."""
    values = {k: v for k, v in vars(args).items() if k != "config"}
    for name in TUPLE_FIELDS:  # comma-separated on the command line
        if isinstance(values.get(name), str):
            values[name] = tuple(n.strip() for n in values[name].split(",") if n.strip())
    if values["fgd_model"] is not None and values["fgd_model"].lower() in ("none", ""):
        values["fgd_model"] = None
    if values["clip_model"] is not None and values["clip_model"].lower() in ("none", ""):
        values["clip_model"] = None
    if values["captions_file"] is not None and str(values["captions_file"]).lower() == "none":
        values["captions_file"], values["reference_free"] = None, True  # score without references (--eval)
    if values["java"] is not None and values["java"].lower() in ("none", ""):
        values["java"] = None
    if values["output_dir"] is None:
        values["output_dir"] = Path("results/demo") if args.mode == "demo" else Path("results")
    if values["model_name"] is None and args.mode == "train":
        values["model_name"] = "microsoft/git-base"
    return Config(**values)


class OncePerProcess(logging.Filter):
    """Each warning text is shown once: libraries repeat theirs on every model load or evaluation."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


class WithoutNotices(logging.Filter):
    """Drops a library's log lines that start with one of `starts`: notices about what this project asked for."""

    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


# transformers says so when `dequantize(dtype=...)` does what models/git_qlora.py and scripts/inference.py ask of it.
QUIET_LOG_LINES = {"transformers.integrations.bitsandbytes": ("The modules are dequantized in",)}


# Library notices a user can do nothing about, matched precisely: PEFT reads the deprecated
# `is_gradient_checkpointing` on every call; our own code asks for the checkpointing it needs.
QUIET_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),
    (UserWarning, r".*MatMul8bitLt: inputs will be cast"),
)


def setup_logging() -> None:
    # Under a launcher the main process tells the story; the others speak only to warn, naming their rank.
    main = distributed.is_main_process()
    prefix = f"[rank {distributed.rank()}] " if distributed.is_distributed() else ""
    root = logging.getLogger()
    existing = set(root.handlers)  # e.g. a test runner's: left as they are
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in set(root.handlers) - existing:
        handler.addFilter(OncePerProcess())
        logging.captureWarnings(True)  # Python warnings go through that handler too, so each shows once
    # bitsandbytes looks for optional CPU kernels on the hub; offline that warning is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score announces its tokenizer
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao 0.18's import (via PEFT) warns about torch's deprecations
    for name, starts in QUIET_LOG_LINES.items():
        if not any(isinstance(f, WithoutNotices) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(WithoutNotices(*starts))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not main or not sys.stderr.isatty():  # one rank's bars suffice; in a log file they only clutter
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_transformers_progress_bars() -> None:
    """setup_logging's choice for transformers' own bars; apart, because importing transformers must wait until
    leave_datasets_unloaded has run."""
    if not distributed.is_main_process() or not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def start_slow_helpers(config: Config) -> None:
    """METEOR's Java process takes 10-30 s to start (its paraphrase table): a mode that will surely score captions
    against references starts it first thing, before validation, whose checks import torch (2-3 s), so it loads
    while Python imports the mode (~8-10 s) and loads the model. (The demo's first scoring waited 3.4-3.6 s for
    it when it started after torch's import.) A command that then fails validation ends it at exit."""
    if distributed.is_main_process() and (config.mode == "demo" or (config.mode == "eval" and not config.reference_free)):
        from utils.java_scorers import start_meteor

        start_meteor(config.java)


def run_mode(config: Config) -> int:
    if config.mode == "train":
        from scripts.trainer import train as run
    elif config.mode == "inference":
        from scripts.inference import run_inference as run
    elif config.mode == "merge_weights":
        from scripts.inference import merge_weights as run
    elif config.mode == "eval":
        from scripts.evaluate import run_evaluation as run
    else:
        # The demo's stages, imported here with the rest (see below) rather than between its stages.
        import scripts.evaluate  # noqa: F401
        import scripts.inference  # noqa: F401
        import scripts.trainer  # noqa: F401
        from scripts.demo import run_demo as run
    imported_without_garbage_collection()
    return run(config)


def imported_without_garbage_collection() -> None:
    """The imports are done (main turned the collector off for them): what they made is kept out of every later
    collection, and the collector is on again.

    Importing torch, transformers, PEFT and bitsandbytes makes ~590,000 objects that live as long as the process;
    with the collector on, Python ran 8-11 full collections over them while importing (1.6-2.2 s of the ~9 s,
    measured in alternating runs), and each full collection later, such as the one the Trainer runs before
    training (Accelerate's free_memory), took 0.35 s. gc.freeze moves them to a generation no collection visits;
    objects are still freed when their last reference goes; only cycles among them wait, for main's unfreeze
    or the process's end (main's process_exits_after)."""
    gc.freeze()
    gc.enable()


def usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    try:
        parser.error(message)  # prints the usage line and the message, as argparse's own errors
    except SystemExit as exit_:
        return int(exit_.code)


def main(argv: list[str] | None = None, *, process_exits_after: bool = False) -> int:
    """Run one command; its exit code. process_exits_after (the script's own entry point): what the imports
    froze stays frozen until the interpreter ends, whose collections at exit then skip it; unfrozen, they walked
    the ~590,000 objects again and again and the exit took 3.0-4.1 s instead of 0.7-1.0 s (measured in
    alternating processes). In-process callers (tests, benchmarks) get the collector back as they had it."""
    collecting = gc.isenabled()
    gc.disable()  # until the mode's imports are done: run_mode, imported_without_garbage_collection
    try:
        return _main(argv)
    finally:
        if not process_exits_after:
            gc.unfreeze()  # for callers that run several commands in one process: their objects collectable again
            if collecting:
                gc.enable()
            else:
                gc.disable()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage error
        return int(exit_.code or 0)
    setup_logging()
    try:
        if args.config is not None:  # the file fills what the command line left unset
            args = apply_config_file(args, explicit_flags(build_parser(), argv))
        if args.mode is None:
            return usage_error(parser, "one of the arguments --train --eval --inference --merge_weights --demo is required "
                               "(or `mode:` in the --config file)")
        config = unchecked_config(args)
        start_slow_helpers(config)  # before anything imports torch
        if args.dataset is None:  # before anything imports transformers
            leave_datasets_unloaded()
        quiet_transformers_progress_bars()
        config = validate(config)  # every rank validates the same flags, so all fail alike before joining
        if config.mode != "demo":  # the demo's 128-wide model ran its steps 10-30% slower with it, and has no GB to return
            return_freed_memory_to_the_os()
        distributed.init_process_group()
        code = run_mode(config)
        distributed.barrier()  # ranks leave together: any rank's exit 0 means the job's files are written
        return code
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; --train and --inference --test_dir continue with --resume", file=sys.stderr)
        return 130
    finally:
        from utils import run_lock

        run_lock.release_all()  # the process's flocks end with it anyway; this is for many commands in one process
        distributed.shutdown()


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def restart_with_huge_pages() -> None:
    """Re-run this command (same process id, arguments and environment) with glibc asking the kernel for
    transparent huge pages for what malloc maps. With the 4 MB mmap threshold above, every tensor buffer over
    4 MB is a fresh mapping whose 4 KB pages each fault in when first written; with 2 MB pages there are 512
    times fewer faults. Measured on the git-base-sized training step (CPU, batch 4): 1.23 -> 1.16 s, peak
    RSS +5-25 MB (README "Training step"). Only where the kernel offers them on request (THP "madvise" or
    "always") and glibc has the tunable (2.35+); GIT_QLORA_HUGE_PAGES=0 turns it off."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables
            or os.environ.get("GIT_QLORA_HUGE_PAGES", "1") == "0" or not _glibc_at_least(2, 35)):
        return
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            if "[never]" in f.read():
                return
    except OSError:
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _glibc_at_least(major: int, minor: int) -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        return name == "glibc" and tuple(int(part) for part in version.split(".")[:2]) >= (major, minor)
    except (ValueError, OSError, AttributeError):
        return False


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main(process_exits_after=True))
