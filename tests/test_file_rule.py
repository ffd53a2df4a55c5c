"""One rule for a file edgetl reads: a regular file under a size limit, checked with ``stat`` before opening.

A named pipe used to block ``edgetl predict`` until killed (opening a FIFO waits for a writer), and a CSV row
naming a folder or a FIFO said "does not exist".
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

import edgetl
from edgetl.data import scan_dataset
from edgetl.data.decode import file_problem, load_rgb
from edgetl.errors import DataError, UnknownNameError

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")


@pytest.fixture
def files(tmp_path):
    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(image)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    return {"image": image, "fifo": fifo, "folder": folder, "missing": tmp_path / "missing.png"}


def test_file_problem_names_what_the_path_is(files):
    assert file_problem(files["image"]) == ""
    assert "named pipe" in file_problem(files["fifo"])
    assert "folder" in file_problem(files["folder"])
    assert "does not exist" in file_problem(files["missing"])
    assert "device" in file_problem(os.devnull)
    assert "limit" in file_problem(files["image"], max_bytes=10)


def test_decoding_a_fifo_is_refused_without_opening_it(files):
    with pytest.raises(DataError, match="named pipe"):
        load_rgb(files["fifo"])  # would block forever if it opened the pipe


def test_csv_rows_say_what_the_path_is(files, tmp_path):
    for name, what in (("fifo", "named pipe"), ("folder", "is a folder")):
        rows = [f"{files['image'].name},a", f"{files['image'].name},b", f"{files[name].name},b"]
        csv_path = tmp_path / f"{name}.csv"
        csv_path.write_text("path,label\n" + "\n".join(rows) + "\n")
        with pytest.raises(DataError, match=what):
            scan_dataset(csv_path)


def test_predict_on_a_fifo_exits_1_with_one_line(files):
    result = subprocess.run(
        [sys.executable, "-m", "edgetl", "predict", "resnet18", "--weights", "none", "--resolution", "32",
         str(files["fifo"])],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and str(files["fifo"]) in errors[0] and "named pipe" in errors[0], result.stderr


def test_predict_says_a_missing_path_does_not_exist(files, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        edgetl.predict(str(tmp_path / "no-such-artifact"), [files["image"]])
    with pytest.raises(DataError, match="does not exist"):
        edgetl.predict("artifacts/no-such-artifact", [files["image"]])
    with pytest.raises(UnknownNameError):
        edgetl.predict("no_such_model", [files["image"]])


def test_an_image_over_the_pixel_limit_is_refused_from_its_header_even_where_pillow_only_warns(tmp_path):
    """12000 x 12000 is between Pillow's warning (89 MP) and its error (179 MP): edgetl refuses it before decoding."""
    from edgetl.data.decode import MAX_IMAGE_PIXELS, check_image

    path = tmp_path / "wide.png"
    Image.new("1", (12_000, 12_000)).save(path)
    assert MAX_IMAGE_PIXELS < 12_000 * 12_000
    for problem in (check_image(path, full=False), check_image(path, full=True)):
        assert "12000x12000 pixels" in problem and "megapixel limit" in problem
    with pytest.raises(DataError, match=r"wide\.png.*12000x12000 pixels"):
        load_rgb(path)
