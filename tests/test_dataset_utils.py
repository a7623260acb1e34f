"""Tests for utils/dataset_utils.py: caption files, image folders, image loading and GIT batches."""

import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from utils.dataset_utils import (
    CaptionCollator,
    CaptionDataset,
    Example,
    build_labels,
    caption_from_filename,
    collect_examples,
    find_images,
    load_captions,
    load_image,
    read_captions_file,
    read_folder_metadata,
    split_by_image,
)
from utils.errors import UserInputError

LOGGER = "utils.dataset_utils"
WORDS = ["a", "red", "car", "blue", "bird", "on", "the", "left", "right", "green", "circle", "big", "dog"]


def make_image(path: Path, size=(16, 12), color=(200, 30, 30), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


# ---------------------------------------------------------------------------
# Captions files
# ---------------------------------------------------------------------------


def test_captions_file_with_header(tmp_path):
    path = write(tmp_path / "c.csv", "image_name,caption\na.jpg,a red car\nb.jpg, a blue bird \n")
    assert read_captions_file(path) == {"a.jpg": ["a red car"], "b.jpg": ["a blue bird"]}


@pytest.mark.parametrize("header", ["file_name,text", "Image,Captions", "FILENAME,Caption"])
def test_captions_file_header_variants(tmp_path, header):
    path = write(tmp_path / "c.csv", f"{header}\na.jpg,a red car\n")
    assert read_captions_file(path) == {"a.jpg": ["a red car"]}


def test_captions_file_without_header_keeps_first_row(tmp_path):
    path = write(tmp_path / "c.csv", "a.jpg,a red car\nb.jpg,a blue bird\n")
    assert read_captions_file(path) == {"a.jpg": ["a red car"], "b.jpg": ["a blue bird"]}


def test_captions_file_with_bom(tmp_path):
    path = write(tmp_path / "c.csv", "\ufeffimage_name,caption\na.jpg,a red car\n")
    assert read_captions_file(path) == {"a.jpg": ["a red car"]}


def test_captions_file_quoted_commas_and_newlines(tmp_path):
    text = 'image_name,caption\na.jpg,"a car, red and fast"\nb.jpg,"line one\nline two"\n'
    captions = read_captions_file(write(tmp_path / "c.csv", text))
    assert captions == {"a.jpg": ["a car, red and fast"], "b.jpg": ["line one\nline two"]}


def test_captions_file_unquoted_commas_are_joined(tmp_path):
    captions = read_captions_file(write(tmp_path / "c.csv", "a.jpg,a car, red, fast\nb.jpg,a bird,,\n"))
    assert captions == {"a.jpg": ["a car, red, fast"], "b.jpg": ["a bird"]}


def test_captions_file_several_captions_keep_order(tmp_path):
    text = "a.jpg,first\nb.jpg,other\na.jpg,second\na.jpg,third\n"
    assert read_captions_file(write(tmp_path / "c.csv", text))["a.jpg"] == ["first", "second", "third"]


def test_captions_file_blank_and_malformed_rows(tmp_path, caplog):
    text = "image_name,caption\n\na.jpg,a red car\n   \nlonely.jpg\nb.jpg,   \n,no name\nc.jpg,ok\n"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        captions = read_captions_file(write(tmp_path / "c.csv", text), allow_partial=True)
    assert captions == {"a.jpg": ["a red car"], "c.jpg": ["ok"]}
    assert "3 row(s) could not be read" in caplog.text and "line 5:" in caplog.text and "line 7:" in caplog.text


def test_captions_file_normalises_names(tmp_path):
    captions = read_captions_file(write(tmp_path / "c.csv", "./sub\\a.jpg,x\n././b.jpg,y\n"))
    assert captions == {"sub/a.jpg": ["x"], "b.jpg": ["y"]}


def test_captions_file_invalid_utf8_row_is_skipped_with_its_line(tmp_path, caplog):
    path = tmp_path / "c.csv"
    path.write_bytes(b"b.jpg,a bird\n" + "a.jpg,caf\u00e9 au lait\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        captions = read_captions_file(path, allow_partial=True)
    assert captions == {"b.jpg": ["a bird"]}
    assert "line 2: not UTF-8 text (byte 0xe9" in caplog.text


def test_captions_file_missing_names_the_flag(tmp_path):
    with pytest.raises(UserInputError, match="--captions_file"):
        read_captions_file(tmp_path / "nope.csv")


def test_captions_file_without_usable_rows(tmp_path):
    with pytest.raises(UserInputError, match="no usable row"):
        read_captions_file(write(tmp_path / "c.csv", "image_name,caption\n\nonly_name.jpg\nb.jpg,\n"))


# ---------------------------------------------------------------------------
# Folder metadata (Hugging Face imagefolder)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["text", "caption"])
def test_metadata_csv(tmp_path, column):
    write(tmp_path / "metadata.csv", f"file_name,{column},extra\na.jpg,a red car,1\nsub/b.png,\"x, y\",2\n")
    assert read_folder_metadata(tmp_path) == {"a.jpg": ["a red car"], "sub/b.png": ["x, y"]}


def test_metadata_jsonl_strings_lists_and_bad_lines(tmp_path, caplog):
    lines = [
        '{"file_name": "a.jpg", "text": "a red car"}',
        '{"file_name": "b.jpg", "text": ["one", "two", " "]}',
        "",
        "{not json",
        '{"file_name": "c.jpg"}',
        '["a list"]',
        '{"file_name": "a.jpg", "text": "again"}',
    ]
    write(tmp_path / "metadata.jsonl", "\n".join(lines))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        captions = read_folder_metadata(tmp_path, allow_partial=True)
    assert captions == {"a.jpg": ["a red car", "again"], "b.jpg": ["one", "two"]}
    assert "3 row(s) could not be read" in caplog.text
    assert all(f"line {n}:" in caplog.text for n in (4, 5, 6))


def test_metadata_jsonl_caption_column(tmp_path):
    write(tmp_path / "metadata.jsonl", '{"file_name": "a.jpg", "caption": ["x", "y"]}\n')
    assert read_folder_metadata(tmp_path) == {"a.jpg": ["x", "y"]}


def test_metadata_absent_returns_none(tmp_path):
    assert read_folder_metadata(tmp_path) is None
    assert load_captions(tmp_path, None) is None


def test_metadata_without_needed_columns(tmp_path):
    write(tmp_path / "metadata.csv", "name,label\na.jpg,x\n")
    with pytest.raises(UserInputError, match="file_name"):
        read_folder_metadata(tmp_path)


def test_load_captions_prefers_captions_file(tmp_path):
    write(tmp_path / "metadata.csv", "file_name,text\na.jpg,from metadata\n")
    csv_path = write(tmp_path / "c.csv", "a.jpg,from csv\n")
    assert load_captions(tmp_path, csv_path) == {"a.jpg": ["from csv"]}
    assert load_captions(tmp_path, None) == {"a.jpg": ["from metadata"]}


# ---------------------------------------------------------------------------
# File names and folders
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, caption",
    [
        ("a_red_car-01.jpg", "a red car"),
        ("sub/Blue-Bird_3.PNG", "Blue Bird"),
        ("deep/er/a__big---dog.jpeg", "a big dog"),
        ("cat 12.jpg", "cat"),
        ("dog01.png", "dog"),
        ("photo_2023-01-05.jpg", "photo"),
        ("route66_map.jpg", "route66 map"),
        ("0001.jpg", "0001"),
        ("sub\\x_y.gif", "x y"),
    ],
)
def test_caption_from_filename(name, caption):
    assert caption_from_filename(name) == caption


def test_find_images(tmp_path):
    for name in ["b.jpg", "a.PNG", "sub/c.JpEg", "sub/deeper/d.webp", "e.bmp", "f.gif", "sub/g.JPG"]:
        make_image(tmp_path / name, fmt="PNG")
    for name in ["notes.txt", "x.tiff", ".hidden.jpg", ".cache/h.jpg", "sub/.git/i.png", "jpg"]:
        write(tmp_path / name, "x")
    assert find_images(tmp_path) == [
        "a.PNG", "b.jpg", "e.bmp", "f.gif", "sub/c.JpEg", "sub/deeper/d.webp", "sub/g.JPG",
    ]


def test_find_images_does_not_follow_symlinked_dirs(tmp_path):
    outside = tmp_path / "outside"
    make_image(outside / "o.jpg")
    folder = tmp_path / "data"
    make_image(folder / "a.jpg")
    os.symlink(outside, folder / "link")
    assert find_images(folder) == ["a.jpg"]


# ---------------------------------------------------------------------------
# collect_examples
# ---------------------------------------------------------------------------


def test_collect_examples_from_filenames(tmp_path):
    make_image(tmp_path / "a_red_car-1.jpg")
    make_image(tmp_path / "sub/blue_bird.png")
    assert collect_examples(tmp_path) == [
        Example("a_red_car-1.jpg", "a red car"),
        Example("sub/blue_bird.png", "blue bird"),
    ]


def test_collect_examples_with_captions_file_and_warnings(tmp_path, caplog):
    folder = tmp_path / "train"
    for name in ["a.jpg", "b.jpg", "sub/c.jpg", "uncaptioned.jpg"]:
        make_image(folder / name)
    write(folder / "empty.jpg", "")
    write(folder / "doc.txt", "x")
    csv_text = (
        "image_name,caption\n"
        "a.jpg,first a\nb.jpg,only b\na.jpg,second a\ntrain/sub/c.jpg,prefixed c\n"
        "missing.jpg,gone\n../escape.jpg,no\n/etc/abs.jpg,no\nC:\\x\\y.jpg,no\n"
        "empty.jpg,zero bytes\ndoc.txt,not an image\n"
    )
    csv_path = write(tmp_path / "captions.csv", csv_text)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        examples = collect_examples(folder, csv_path)
    assert examples == [
        Example("a.jpg", "first a"),
        Example("a.jpg", "second a"),
        Example("b.jpg", "only b"),
        Example("sub/c.jpg", "prefixed c"),
    ]
    text = caplog.text
    assert "outside the folder (3): ../escape.jpg, /etc/abs.jpg, C:/x/y.jpg" in text
    assert "missing.jpg" in text and "not in" in text
    assert "doc.txt" in text and "not images" in text
    assert "no caption (1): uncaptioned.jpg" in text
    assert "zero-byte" in text and "empty.jpg" in text


def test_collect_examples_long_warning_lists_are_cut(tmp_path, caplog):
    make_image(tmp_path / "img" / "a.jpg")
    rows = "a.jpg,x\n" + "".join(f"m{i:02d}.jpg,x\n" for i in range(25))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        collect_examples(tmp_path / "img", write(tmp_path / "c.csv", rows))
    assert "(25): m00.jpg" in caplog.text and "m09.jpg and 15 more" in caplog.text
    assert "m10.jpg" not in caplog.text


def test_collect_examples_uses_folder_metadata(tmp_path):
    make_image(tmp_path / "a.jpg")
    write(tmp_path / "metadata.jsonl", '{"file_name": "a.jpg", "text": ["x", "y"]}\n')
    assert collect_examples(tmp_path) == [Example("a.jpg", "x"), Example("a.jpg", "y")]


def test_collect_examples_missing_folder(tmp_path):
    with pytest.raises(UserInputError, match="--val_dir .*does not exist"):
        collect_examples(tmp_path / "nope", flag="--val_dir")


def test_collect_examples_folder_is_a_file(tmp_path):
    with pytest.raises(UserInputError, match="--train_dir .*not a folder"):
        collect_examples(write(tmp_path / "f.jpg", "x"))


def test_collect_examples_no_images(tmp_path):
    write(tmp_path / "readme.txt", "x")
    make_image(tmp_path / ".hidden.jpg")
    with pytest.raises(UserInputError, match="--train_dir .*holds no images"):
        collect_examples(tmp_path)


def test_collect_examples_csv_matching_nothing_shows_both_sides(tmp_path):
    folder = tmp_path / "photos"
    make_image(folder / "a.jpg")
    make_image(folder / "b.jpg")
    csv_path = write(tmp_path / "c.csv", "data/photos/a.jpg,x\ndata/photos/b.jpg,y\n")
    with pytest.raises(UserInputError) as info:
        collect_examples(folder, csv_path, flag="--eval_dir")
    message = str(info.value)
    assert "--captions_file" in message and "--eval_dir" in message
    assert "data/photos/a.jpg" in message and "Images found: a.jpg, b.jpg" in message


def test_collect_examples_only_empty_images(tmp_path):
    write(tmp_path / "a.jpg", "")
    with pytest.raises(UserInputError, match="no non-empty image"):
        collect_examples(tmp_path)


# ---------------------------------------------------------------------------
# split_by_image
# ---------------------------------------------------------------------------


def make_examples(n_images: int, per_image: int = 3) -> list[Example]:
    return [Example(f"img{i:03d}.jpg", f"caption {j}") for i in range(n_images) for j in range(per_image)]


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_split_by_image_keeps_images_whole(ratio):
    examples = make_examples(37)
    for seed in range(8):
        train, val = split_by_image(examples, ratio, seed)
        train_names, val_names = {e.image_name for e in train}, {e.image_name for e in val}
        assert not train_names & val_names
        assert sorted(train + val, key=examples.index) == examples
        assert len(val_names) == max(1, round(ratio * 37))
        assert all(len([e for e in val if e.image_name == n]) == 3 for n in val_names)


def test_split_by_image_is_deterministic_and_seed_dependent():
    examples = make_examples(50)
    assert split_by_image(examples, 0.2, 7) == split_by_image(examples, 0.2, 7)
    assert split_by_image(examples, 0.2, 7)[1] != split_by_image(examples, 0.2, 8)[1]


def test_split_by_image_edge_cases():
    examples = make_examples(3)
    assert split_by_image(examples, 0.0, 0) == (examples, [])
    train, val = split_by_image(examples, 0.01, 0)  # rounds to 0 images: at least one held out
    assert len({e.image_name for e in val}) == 1
    train, val = split_by_image(examples, 0.99, 0)  # rounds to 3 images: one kept for training
    assert len({e.image_name for e in train}) == 1
    one = make_examples(1)
    assert split_by_image(one, 0.5, 0) == (one, [])
    with pytest.raises(ValueError):
        split_by_image(examples, 1.0, 0)


# ---------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------


def test_load_image_truncated_png(tmp_path):
    path = tmp_path / "t.png"
    Image.effect_noise((64, 64), 60).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    image, reason = load_image(path)
    assert image is None and "truncated" in reason


@pytest.mark.parametrize("content", [b"", b"this is not an image at all"])
def test_load_image_not_an_image(tmp_path, content):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    image, reason = load_image(path)
    assert image is None and reason


def test_load_image_missing_file(tmp_path):
    image, reason = load_image(tmp_path / "nope.jpg")
    assert image is None and reason


def test_load_image_exif_rotation(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 200, 10)).save(path, exif=exif)
    image, reason = load_image(path)
    assert reason is None and image.mode == "RGB" and image.size == (20, 40)


def test_load_image_rgba_composites_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))
    img.save(tmp_path / "a.png")
    image, _ = load_image(tmp_path / "a.png")
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 1)) == (255, 0, 0)


def test_load_image_palette_and_animated_gif(tmp_path):
    frames = [Image.new("RGB", (8, 8), c).convert("P") for c in [(0, 0, 255), (255, 0, 0)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    image, reason = load_image(tmp_path / "anim.gif")
    assert reason is None and image.mode == "RGB" and image.getpixel((3, 3)) == (0, 0, 255)


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 128, (128,) * 3),
        ("CMYK", (0, 0, 0, 0), (255,) * 3),
        ("I;16", 65535, (255,) * 3),  # 16-bit white must stay white, not be clipped oddly
        ("LA", (50, 0), (255,) * 3),  # fully transparent grey composites to white
    ],
)
def test_load_image_other_modes(tmp_path, mode, value, expected):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.new(mode, (4, 4), value).save(path)
    image, reason = load_image(path)
    assert reason is None and image.mode == "RGB"
    assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((1, 1)), expected))


# The image has 400 px: above 2x the limit Pillow raises an error, between 1x and 2x it only warns.
@pytest.mark.parametrize("limit", [100, 300])
def test_load_image_decompression_bomb(tmp_path, monkeypatch, limit):
    path = make_image(tmp_path / "bomb.png", size=(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    image, reason = load_image(path)
    assert image is None and "decompression bomb" in reason


# ---------------------------------------------------------------------------
# CaptionDataset
# ---------------------------------------------------------------------------


def test_caption_dataset_loads_lazily_and_skips_bad_images(tmp_path, caplog):
    make_image(tmp_path / "a.jpg")
    write(tmp_path / "bad.jpg", "not an image")
    make_image(tmp_path / "c.png", color=(0, 0, 255))
    names = ["a.jpg", "bad.jpg", "bad.jpg", "c.png"]
    examples = [Example(n, c) for n, c in zip(names, ["x", "y", "y2", "z"])]
    dataset = CaptionDataset(tmp_path, examples)
    assert len(dataset) == 4
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        items = [dataset[i] for i in range(4)] + [dataset[1]]
    assert [it["image_name"] for it in items] == ["a.jpg", "c.png", "c.png", "c.png", "c.png"]
    assert items[0]["caption"] == "x" and items[1]["caption"] == "z"
    assert isinstance(items[1]["image"], Image.Image) and items[1]["image"].mode == "RGB"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("Skipping") and "bad.jpg" in messages[0]
    with pytest.raises(IndexError):
        dataset[4]
    assert len(list(dataset)) == 4  # iteration stops at the end instead of wrapping forever


def test_caption_dataset_returns_none_when_nothing_loads(tmp_path):
    write(tmp_path / "bad.jpg", "nope")
    assert CaptionDataset(tmp_path, [Example("bad.jpg", "x")])[0] is None


# ---------------------------------------------------------------------------
# Labels, collator and GIT loss
# ---------------------------------------------------------------------------


def test_build_labels():
    input_ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = build_labels(input_ids, mask)
    assert labels.tolist() == [[2, 5, 6, 3], [2, 7, 3, -100]]
    assert input_ids[1, 3] == 0  # input not modified


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import BertTokenizer, CLIPImageProcessor, GitProcessor

    folder = tmp_path_factory.mktemp("tok")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tokenizer = BertTokenizer.from_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return GitProcessor(image_processor=image_processor, tokenizer=tokenizer)


def make_batch(captions):
    return [{"image": Image.new("RGB", (40, 30), (i * 40, 0, 0)), "caption": c, "image_name": f"{i}.jpg"}
            for i, c in enumerate(captions)]


def test_collator_builds_git_inputs(processor):
    captions = ["a red car", "a big blue bird on the left"]
    batch = CaptionCollator(processor, max_length=40)(make_batch(captions) + [None])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == (2, 9) and mask[0].tolist() == [1] * 5 + [0] * 4
    assert torch.equal(labels[mask == 1], ids[mask == 1]) and (labels[mask == 0] == -100).all()
    tokenizer = processor.tokenizer
    assert ids[0, 0] == tokenizer.cls_token_id and ids[0, 4] == tokenizer.sep_token_id
    assert tokenizer.decode(ids[1], skip_special_tokens=True) == captions[1]


def test_collator_truncates(processor):
    batch = CaptionCollator(processor, max_length=5)(make_batch(["a big blue bird on the left"]))
    assert batch["input_ids"].shape == (1, 5)
    assert batch["input_ids"][0, -1] == processor.tokenizer.sep_token_id
    assert processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "a big blue"


def test_collator_rejects_a_batch_with_no_image(processor):
    with pytest.raises(RuntimeError, match="No image"):
        CaptionCollator(processor)([None, None])


def test_git_loss_equals_hand_computed_cross_entropy(processor):
    from transformers import GitConfig, GitForCausalLM

    torch.manual_seed(0)
    config = GitConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=len(processor.tokenizer),
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 16},
    )
    model = GitForCausalLM(config).eval()
    batch = CaptionCollator(processor)(make_batch(["a red car", "a big blue bird on the left"]))
    assert (batch["labels"] == -100).any()  # padding is present, so ignore_index is exercised
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(**inputs).logits
        loss = model(**inputs, labels=batch["labels"]).loss
    text_logits = logits[:, -batch["input_ids"].shape[1]:]
    hand = torch.nn.functional.cross_entropy(
        text_logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
    )
    assert torch.allclose(loss, hand, atol=1e-5), (loss.item(), hand.item())
