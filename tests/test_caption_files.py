"""Caption files that cannot lie quietly: broken rows are named by line, and too many of them stop the run."""

import csv
import io
import json
import logging

import pytest

from git_qlora_main import main
from utils.caption_files import read_captions_file, read_folder_metadata
from utils.errors import UserInputError

LOGGER = "utils.dataset_utils"


def forty_rows(broken_line: int, broken: str) -> list[str]:
    """40 `img_NNN.png,caption` lines; line `broken_line` (1-based) replaced by `broken`."""
    lines = [f"img_{i:03d}.png,caption number {i}, with a comma" for i in range(40)]
    lines[broken_line - 1] = broken
    return lines


def reference(lines: list[str], drop: set[int]) -> dict[str, list[str]]:
    """What Python's csv module reads from the file without the dropped lines: the independent reference."""
    kept = "\n".join(line for n, line in enumerate(lines, start=1) if n not in drop) + "\n"
    out: dict[str, list[str]] = {}
    for row in csv.reader(io.StringIO(kept)):
        out.setdefault(row[0], []).append(",".join(row[1:]).strip())
    return out


def test_unbalanced_quote_on_line_7_is_named_and_loses_only_that_row(tmp_path, caplog):
    lines = forty_rows(7, 'img_006.png,"a dog with an unbalanced quote')
    path = tmp_path / "captions.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserInputError) as error:
        read_captions_file(path)
    message = str(error.value)
    assert "line 7: a quoted caption opens here and never closes" in message
    assert "line 8 looks like a new row" in message and "1 of the 40 listed images (2.5%)" in message
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        captions = read_captions_file(path, allow_partial=True)
    assert captions == reference(lines, {7})
    assert len(captions) == 39 and max(len(c[0]) for c in captions.values()) < 40  # no caption swallowed rows


def test_real_multi_line_captions_and_literal_quotes_stay(tmp_path):
    text = 'a.png,"two\nlines"\nb.png,a 5" screen\nc.png,"say ""hi"""\r\nd.png,"x\r\ny, z"\r\n'
    path = tmp_path / "c.csv"
    path.write_bytes(text.encode())
    assert read_captions_file(path) == {"a.png": ["two\nlines"], "b.png": ['a 5" screen'], "c.png": ['say "hi"'],
                                        "d.png": ["x\ny, z"]}


def test_quote_left_open_at_the_end_of_the_file(tmp_path):
    lines = [f"img_{i:03d}.png,ok {i}" for i in range(9)] + ['img_009.png,"never closed', "and more text"]
    path = tmp_path / "c.csv"
    path.write_text("\n".join(lines))
    with pytest.raises(UserInputError, match=r"line 10: a quoted caption opens here and never closes \(the file ends first\)"):
        read_captions_file(path)


@pytest.mark.parametrize("broken, reason", [
    (b"img_011.png,a cat\rjunk\x00\x07 bytes", "control characters"),
    (b"img_011.png,caf\xe9 au lait", "not UTF-8 text (byte 0xe9 at column 16)"),
    (b"img_011.png", "no `image_name,caption` pair"),
    (b"img_011.png,   ", "no `image_name,caption` pair"),
])
def test_malformed_row_is_skipped_with_its_line_number(tmp_path, caplog, broken, reason):
    lines = [f"img_{i:03d}.png,caption {i}".encode() for i in range(40)]
    lines[11] = broken  # line 12
    path = tmp_path / "c.csv"
    path.write_bytes(b"image_name,caption\r\n" + b"\r\n".join(lines) + b"\r\n")
    with pytest.raises(UserInputError) as error:
        read_captions_file(path)
    assert f"line 13: {reason}" in str(error.value)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        captions = read_captions_file(path, allow_partial=True)
    assert sorted(captions) == [f"img_{i:03d}.png" for i in range(40) if i != 11]
    assert f"line 13: {reason}" in caplog.text


def test_loss_below_one_percent_only_warns_and_the_first_ten_are_named(tmp_path, caplog):
    lines = [f"img_{i:04d}.png,caption {i}" for i in range(1200)]
    for i in range(0, 1200, 100):  # 12 broken rows: 1.0%, not more
        lines[i] = f"img_{i:04d}.png,\x01"
    path = tmp_path / "c.csv"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        captions = read_captions_file(path)
    assert len(captions) == 1188
    assert "12 of the 1200 listed images (1.0%)" in caplog.text
    assert "line 901:" in caplog.text and "line 1001:" not in caplog.text and "and 2 more row(s)" in caplog.text
    lines[50] = "img_0050.png"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserInputError, match=r"13 of the 1200 listed images \(1.1%\)"):
        read_captions_file(path)


def test_a_lost_row_of_an_image_that_has_other_captions_costs_no_image(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('a.png,first\na.png,"broken\nb.png,fine\n')
    assert read_captions_file(path) == {"a.png": ["first"], "b.png": ["fine"]}


def test_metadata_csv_and_jsonl_name_their_lines(tmp_path):
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,one\nb.png\n" + "".join(f"x{i}.png,ok\n" for i in range(20)))
    with pytest.raises(UserInputError, match=r"metadata.csv: 1 row\(s\) could not be read.*line 3: 1 field\(s\) where the header has 2"):
        read_folder_metadata(tmp_path)
    assert len(read_folder_metadata(tmp_path, allow_partial=True)) == 21
    (tmp_path / "metadata.csv").unlink()
    rows = [json.dumps({"file_name": f"x{i}.png", "text": "ok"}) for i in range(20)]
    rows[4] = '{"file_name": "x4.png", "text": "cut'
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows))
    with pytest.raises(UserInputError, match=r"line 5: not JSON"):
        read_folder_metadata(tmp_path)


# ---------------------------------------------------------------------------
# Through the command line
# ---------------------------------------------------------------------------


def broken_captions(data_dir, tmp_path):
    """One caption per training image (24), line 7 with an unbalanced quote."""
    names = sorted(p.name for p in (data_dir / "train").glob("*.png"))
    lines = [f"{name},a picture number {i}" for i, name in enumerate(names)]
    lines[6] = f'{names[6]},"a dog with an unbalanced quote'
    path = tmp_path / "captions.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, names


def test_train_stops_with_exit_2_naming_file_and_line(data_dir, tiny_model_dir, tmp_path, capsys):
    path, _ = broken_captions(data_dir, tmp_path)
    code = main(["--train", "--train_dir", str(data_dir / "train"), "--captions_file", str(path), "--model_name",
                 str(tiny_model_dir), "--output_dir", str(tmp_path / "runs"), "--run_name", "r", "--fgd_model", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err and "line 7: a quoted caption opens here" in err and "--allow_partial_captions" in err
    assert "Traceback" not in err and not (tmp_path / "runs" / "r").exists()


def test_allow_partial_captions_goes_on_knowingly(data_dir, tmp_path, capsys, caplog):
    path, names = broken_captions(data_dir, tmp_path)
    predictions = tmp_path / "predictions.csv"
    predictions.write_text("\n".join(f"{name},a picture number {i}" for i, name in enumerate(names)) + "\n")
    argv = ["--eval", "--predictions_file", str(predictions), "--captions_file", str(path), "--fgd_model", "none",
            "--output_dir", str(tmp_path / "eval")]
    assert main(argv) == 2
    assert "line 7" in capsys.readouterr().err
    assert main(argv + ["--allow_partial_captions"]) == 0
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["num_images"] == 23
    assert "line 7: a quoted caption opens here" in caplog.text and "Those rows are skipped" in caplog.text


def test_dataset_caption_column_mostly_empty_stops_unless_allowed(data_dir, tiny_model_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from utils.hf_datasets import DatasetSpec, load_train_and_eval

    names = sorted(p.name for p in (data_dir / "train").glob("*.png"))
    texts = ["" if i % 2 else f"picture {i}" for i in range(len(names))]  # every second caption cell empty
    table = pa.table({"image": [{"bytes": (data_dir / "train" / n).read_bytes(), "path": n} for n in names], "text": texts})
    pq.write_table(table, tmp_path / "train-00000.parquet")
    code = main(["--train", "--dataset", str(tmp_path), "--model_name", str(tiny_model_dir), "--output_dir",
                 str(tmp_path / "runs"), "--fgd_model", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "12 of 24 rows (50.0%) have no caption in column 'text'" in err and "--allow_partial_captions" in err
    train, _ = load_train_and_eval(DatasetSpec(str(tmp_path), allow_partial_captions=True), hold_out=False)
    assert sorted(e.caption for e in train.examples) == sorted(t for t in texts if t)
