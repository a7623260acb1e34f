"""Model cards (README.md) for RUN/final_model and RUN/merged_model, from the run's settings and metrics: pure text."""

from pathlib import Path

from utils.hub import looks_like_path

GLOB_CHARS = "*?["
METRIC_NAMES = {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "rouge_l": "ROUGE-L",
                "rouge_1": "ROUGE-1", "rouge_2": "ROUGE-2", "cider": "CIDEr", "meteor": "METEOR", "spice": "SPICE",
                "fgd": "FGD", "clip_score": "CLIPScore", "ref_clip_score": "RefCLIPScore"}


def hub_id(name: str | None) -> str | None:
    """name when it is a hub id (org/name or name, not an existing path), else None: a local folder is never
    written into the card's metadata."""
    if not name or looks_like_path(name) or Path(name).expanduser().exists() or any(c in name for c in GLOB_CHARS):
        return None
    return name


def _scores(metrics: dict | None, key: str) -> dict[str, float]:
    part = (metrics or {}).get(key) or {}
    return {k: v for k, v in part.items() if isinstance(v, float) and not k.startswith("num_")}


def front_matter(settings: dict, metrics: dict | None, library: str) -> dict:
    base, dataset = hub_id(settings.get("model_name")), hub_id(settings.get("dataset"))
    tags = ["git", "image-captioning", "lora", "peft"]
    tags += ["qlora", f"{settings.get('quantization_bits')}-bit", "bitsandbytes"] if settings.get("quantization_bits") in (4, 8) else []
    tags += ["merged"] if library == "transformers" else []
    meta = {"library_name": library, "pipeline_tag": "image-to-text", "tags": tags}
    if base is not None:
        meta = {"base_model": base, **meta}
    if dataset is not None:
        meta["datasets"] = [dataset]
    after = _scores(metrics, "after")
    if after:
        data = {"type": dataset or "imagefolder", "name": dataset or "validation images (local folder)"}
        if dataset and settings.get("eval_split"):
            data["split"] = settings["eval_split"]
        meta["model-index"] = [{"name": settings.get("run_name") or "git-qlora", "results": [{
            "task": {"type": "image-to-text", "name": "Image captioning"}, "dataset": data,
            "metrics": [{"type": k, "value": round(v, 4), "name": f"{METRIC_NAMES.get(k, k)} (validation, after training)"}
                        for k, v in sorted(after.items())]}]}]
    return meta


def _base_text(settings: dict) -> str:
    name = settings.get("model_name") or "?"
    if hub_id(name) is not None:
        return f"[{name}](https://huggingface.co/{name})"
    return f"a local checkpoint (`{Path(name).name}`, not on the hub)"


def _training_rows(settings: dict, metrics: dict) -> list[tuple[str, str]]:
    early = metrics.get("early_stopping") or {}
    rows = [
        ("Base model", _base_text(settings)),
        ("Precision", settings.get("precision") or f"{settings.get('quantization_bits')}-bit base"),
        ("LoRA", f"r {settings.get('lora_r')}, alpha {settings.get('lora_alpha')}, dropout {settings.get('lora_dropout')}, "
                 f"on {', '.join(settings.get('lora_target_modules') or [])}"),
        ("Optimizer steps", str(metrics.get("global_step", "?"))),
        ("Effective batch", f"{settings.get('effective_batch_size', '?')} images per step on {settings.get('world_size', 1)} process(es)"),
        ("Learning rate", f"{settings.get('learning_rate')} (peak, linear decay, warm-up {settings.get('warmup_ratio')})"),
        ("Training data", _data_text(settings)),
        ("Caption length", f"{settings.get('max_length')} tokens"),
    ]
    if "train_loss" in metrics:
        rows.append(("Final training loss", f"{metrics['train_loss']:.4f}"))
    if early:
        rows.append(("Early stopping", early.get("reason") or f"patience {early.get('patience')}: did not stop early"))
    return rows


def _data_text(settings: dict) -> str:
    count = settings.get("num_train_examples")
    size = f"{count} captioned examples" if count is not None else "a stream (--streaming)"
    dataset = settings.get("dataset")
    if dataset:
        where = f"hub dataset `{dataset}`" if hub_id(dataset) else "a local dataset"
        return f"{size} from {where} (split {settings.get('train_split')}), {settings.get('num_val_examples', 0)} for validation"
    return f"{size} from a local image folder, {settings.get('num_val_examples', 0)} for validation"


def _metrics_section(settings: dict, metrics: dict) -> list[str]:
    before, after = _scores(metrics, "before"), _scores(metrics, "after")
    if not after:
        return ["## Validation", "", "No validation images: no caption metrics were measured.", ""]
    lines = ["## Validation", "", "| metric | base before training | with this adapter | change |", "|---|---|---|---|"]
    for key in sorted(after):
        was = before.get(key)
        change = f"{after[key] - was:+.4f}" if was is not None else ""
        lines.append(f"| {METRIC_NAMES.get(key, key)} | {'' if was is None else f'{was:.4f}'} | {after[key]:.4f} | {change} |")
    images = (metrics.get("after") or {}).get("num_images")
    tokenizer = metrics.get("caption_tokenizer") or (metrics.get("after") or {}).get("caption_tokenizer") or settings.get("caption_tokenizer")
    beams = settings.get("num_beams", 1)
    protocol = (f"Protocol: COCO caption metrics (pycocoevalcap) on {images if images is not None else '?'} validation "
                f"images, captions generated {'greedily' if beams == 1 else f'with beam search ({beams} beams)'} up to "
                f"{settings.get('max_new_tokens') or settings.get('max_length')} tokens")
    protocol += f", caption tokenizer {tokenizer}." if tokenizer else "."
    if "val_loss" in metrics:
        protocol += f" Validation loss after training: {metrics['val_loss']:.4f}."
    return lines + ["", protocol, ""]


def _usage(settings: dict, run_dir: str, merged: bool) -> list[str]:
    base = settings.get("model_name")
    folder = f"{run_dir}/merged_model" if merged else f"{run_dir}/final_model"
    imports = ["from PIL import Image", "from transformers import AutoModelForCausalLM, AutoProcessor"]
    if merged:
        load = f'model = AutoModelForCausalLM.from_pretrained("{folder}")'
    else:
        imports.append("from peft import PeftModel")
        load = (f'base = AutoModelForCausalLM.from_pretrained("{base}")  # as trained: add quantization_config=BitsAndBytesConfig(...)\n'
                f'model = PeftModel.from_pretrained(base, "{folder}")')
    return [
        "## How to use", "",
        "With this project's command line:", "", "```bash",
        f"python git_qlora_main.py --inference --output_dir {run_dir} --test_image photo.jpg"
        + (" --use_merged" if merged else ""), "```", "",
        "With transformers" + ("" if merged else " and PEFT") + " (the GIT captioning recipe of the base model's card):", "",
        "```python", *imports, "",
        f'processor = AutoProcessor.from_pretrained("{folder}")', load, "",
        'pixel_values = processor(images=Image.open("photo.jpg").convert("RGB"), return_tensors="pt").pixel_values',
        f"ids = model.generate(pixel_values=pixel_values, max_new_tokens={settings.get('max_length', 40)})",
        "print(processor.batch_decode(ids, skip_special_tokens=True)[0])", "```", "",
    ]


def build_model_card(settings: dict, metrics: dict | None, run_dir: str, merge_report: dict | None = None) -> str:
    """README.md text: YAML metadata, what was trained, validation before/after, how to load, where the curves are.
    merge_report given: the card of RUN/merged_model (plain transformers); else of RUN/final_model (PEFT adapter)."""
    import yaml

    merged, metrics = merge_report is not None, metrics or {}
    meta = front_matter(settings, metrics, "transformers" if merged else "peft")
    what = "merged into its base (plain transformers weights)" if merged else "a LoRA adapter (PEFT)"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {settings.get('run_name') or 'GIT-QLoRA run'}: GIT image captioning, {what}", "",
             f"Fine-tuned from {_base_text(settings)} with QLoRA by GIT-QLoRA (`git_qlora_main.py --train`).", "",
             "## Training", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _training_rows(settings, metrics)] + [""]
    if merged:
        lines += [f"Merged into the {merge_report.get('merge_base')} base, saved as {merge_report.get('merge_dtype')}."]
        if "caption_agreement" in merge_report:
            lines[-1] += (f" Against the adapter model on {merge_report.get('images')} images: captions agree "
                          f"{100 * merge_report['caption_agreement']:.0f}%, max |logit difference| "
                          f"{merge_report.get('max_abs_logit_diff', float('nan')):.4g}.")
        lines.append("")
    lines += _metrics_section(settings, metrics) + _usage(settings, run_dir, merged)
    lines += ["## Training curves", "", "The training and validation loss over the steps, with sample captions: "
              "`report.html` in the run folder (data in `train_history.json`, TensorBoard logs in `logs/`).", ""]
    return "\n".join(lines)
