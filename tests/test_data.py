"""Tests for edgetl.data: decoding, dataset discovery, splits, CSV input, transforms, loaders, demo data.

Every image is a real file written with PIL into tmp_path.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgetl.data import (
    ALPHA_BACKGROUND,
    DEMO_SHAPES,
    DEMO_TEXTURES,
    SPLITS,
    DatasetSplits,
    DecodedStore,
    build_tensor_pipeline,
    build_transform,
    check_image,
    duplicates,
    estimate_bytes,
    load_rgb,
    make_demo_dataset,
    make_loader,
    scan_dataset,
    to_rgb,
)
from edgetl.data.duplicates import HEAD_BYTES, same_bytes
from edgetl.errors import DataError, EdgetlError, UnknownNameError
from edgetl.zoo.catalog import Preprocess

PRE = Preprocess(resize_size=40, crop_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


_FRESH = itertools.count(1)


def _img(path: Path, colour: tuple[int, int, int] | None = None, size=(12, 12), fmt: str | None = None) -> Path:
    """A one-colour image; without ``colour``, a colour no other image of the session has (so no two
    images are byte-identical copies, which a dataset refuses or merges)."""
    if colour is None:
        n = next(_FRESH) * 7919 % (1 << 24)  # odd: one colour per image, neighbours far apart (JPEG too)
        colour = (n & 255, (n >> 8) & 255, n >> 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _tree(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for name, n in counts.items():
        for i in range(n):
            _img(root / name / f"{name}_{i:03d}{ext}")
    return root


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --- decoding -------------------------------------------------------------------------------------


def test_grayscale_and_bilevel_decode_to_rgb(tmp_path):
    Image.new("L", (6, 4), 77).save(tmp_path / "g.png")
    Image.new("1", (6, 4), 1).save(tmp_path / "b.bmp")
    g = load_rgb(tmp_path / "g.png")
    b = load_rgb(tmp_path / "b.bmp")
    assert g.mode == b.mode == "RGB"
    assert g.size == (6, 4)
    assert g.getpixel((0, 0)) == (77, 77, 77)
    assert b.getpixel((0, 0)) == (255, 255, 255)


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200  # red everywhere
    arr[0, 0, 3] = 0  # fully transparent
    arr[0, 1, 3] = 255  # opaque
    arr[0, 2, 3] = 128  # half
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    im = load_rgb(tmp_path / "a.png")
    assert ALPHA_BACKGROUND == (255, 255, 255)
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255)
    assert im.getpixel((1, 0)) == (200, 0, 0)
    r, g, _ = im.getpixel((2, 0))
    assert 220 <= r <= 235 and 120 <= g <= 135  # halfway between red and white
    black = load_rgb(tmp_path / "a.png", background=(0, 0, 0))
    assert black.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency_and_pa(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    im = load_rgb(tmp_path / "p.png")
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255)  # the transparent index
    assert im.getpixel((1, 1)) == (10, 200, 30)

    Image.new("P", (3, 3), 1).save(tmp_path / "plain.gif")  # palette without transparency
    assert load_rgb(tmp_path / "plain.gif").mode == "RGB"

    pa = Image.new("PA", (2, 2))
    pa.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pa.putpixel((0, 0), (1, 255))
    pa.putpixel((1, 0), (1, 0))
    out = to_rgb(pa)
    assert out.getpixel((0, 0)) == (10, 200, 30)
    assert out.getpixel((1, 0)) == (255, 255, 255)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    im = load_rgb(tmp_path / "d.png")
    assert im.mode == "RGB"
    assert [im.getpixel((x, 0))[0] for x in range(4)] == [0, 4, 128, 255]


def test_32bit_int_tiff_is_scaled(tmp_path):
    arr = np.array([[0, 32896, 65535]], dtype=np.int32)
    Image.fromarray(arr).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    im = load_rgb(tmp_path / "i.tif")
    assert [im.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_image_in_unit_range():
    im = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert [im.getpixel((x, 0))[0] for x in range(3)] == [0, 127, 255]


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    im = load_rgb(tmp_path / "c.jpg")
    assert im.mode == "RGB"
    r, g, b = im.getpixel((8, 8))
    assert r > 230 and g < 25 and b < 25


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(tmp_path / "o.jpg", exif=exif, quality=95)
    im = load_rgb(tmp_path / "o.jpg")
    assert im.size == (20, 40)  # portrait once rotated
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 34))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("ext", [".bmp", ".tif", ".webp", ".gif", ".jpeg"])
def test_other_formats(tmp_path, ext):
    _img(tmp_path / f"x{ext}")
    assert load_rgb(tmp_path / f"x{ext}").mode == "RGB"


def test_bad_files_raise_dataerror_naming_them(tmp_path):
    trunc = _truncated_jpeg(tmp_path / "trunc.jpg")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in (trunc, garbage, empty, tmp_path / "missing.png"):
        with pytest.raises(DataError, match=path.name):
            load_rgb(path)
    assert check_image(trunc, full=True)
    assert check_image(trunc, full=False) == ""  # a header check cannot see a truncated JPEG
    assert check_image(garbage, full=False)
    assert check_image(empty, full=False) == "empty file"


# --- discovery, bad files, errors -----------------------------------------------------------------


def _dataset_with_bad_files(root: Path) -> tuple[Path, Path]:
    _tree(root / "train", {"cat": 5, "dog": 5})
    _tree(root / "val", {"cat": 2, "dog": 2})
    trunc = _truncated_jpeg(root / "train" / "cat" / "trunc.jpg")
    garbage = root / "val" / "dog" / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return trunc, garbage


def test_bad_files_are_skipped_with_named_warning_and_counted(tmp_path, caplog):
    trunc, garbage = _dataset_with_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="edgetl.data"):
        splits = scan_dataset(tmp_path, check="full")
    assert splits.source == "folders"
    assert {p for p, _ in splits.skipped} == {trunc, garbage}
    assert trunc.name in caplog.text and garbage.name in caplog.text
    all_paths = [p for p, _ in splits.train + splits.val + splits.test]
    assert trunc not in all_paths and garbage not in all_paths
    assert (len(splits.train), len(splits.val)) == (10, 4)
    summary = splits.summary()
    assert summary["skipped"] == 2
    assert {d["path"] for d in summary["skipped_files"]} == {str(trunc), str(garbage)}


def test_bad_files_error_mode(tmp_path):
    _dataset_with_bad_files(tmp_path)
    with pytest.raises(DataError, match=r"trunc\.jpg.*2 bad files"):
        scan_dataset(tmp_path, on_bad_image="error", check="full")


def test_header_check_leaves_truncated_jpeg_to_the_loader(tmp_path, caplog):
    trunc, garbage = _dataset_with_bad_files(tmp_path)
    splits = scan_dataset(tmp_path, check="header")
    assert [p for p, _ in splits.skipped] == [garbage]  # the header check catches garbage only
    assert trunc in [p for p, _ in splits.train]

    tf = build_transform(PRE)
    loader = make_loader(splits.train, tf, batch_size=4, shuffle=False, skipped=splits.skipped)
    with caplog.at_level(logging.WARNING, logger="edgetl.data"):
        for _ in range(2):  # two epochs: the file is reported once
            seen = sum(len(y) for _, y in loader)
            assert seen == len(splits.train) - 1
    assert trunc.name in caplog.text
    assert caplog.text.count(trunc.name) == 1
    assert [p for p, _ in splits.skipped] == [garbage, trunc]
    assert loader.skipped is splits.skipped

    strict = make_loader(splits.train, tf, batch_size=4, shuffle=False, on_bad_image="error")
    with pytest.raises(DataError, match=r"trunc\.jpg"):
        list(strict)


def test_bad_file_in_worker_process_is_reported(tmp_path):
    trunc, _ = _dataset_with_bad_files(tmp_path)
    splits = scan_dataset(tmp_path, check="none")
    loader = make_loader(splits.train, build_transform(PRE), batch_size=3, shuffle=True, num_workers=1)
    assert loader.persistent_workers and not loader.pin_memory
    labels = torch.cat([y for _, y in loader])
    assert len(labels) == len(splits.train) - 1
    assert [p for p, _ in loader.skipped] == [trunc]


def test_empty_class_folder_is_an_error(tmp_path):
    _tree(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match=r"class folder .*c has no images.*add images to it or remove it"):
        scan_dataset(tmp_path)


def test_single_class_is_an_error(tmp_path):
    _tree(tmp_path, {"only": 4})
    with pytest.raises(DataError, match=r"only one class \('only'\).*at least two"):
        scan_dataset(tmp_path)


def test_no_images_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="has no images"):
        scan_dataset(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"no images found in .*{empty.name}"):
        scan_dataset(empty)
    loose = tmp_path / "loose"
    _img(loose / "x.png")
    with pytest.raises(DataError, match="no class folders"):
        scan_dataset(loose)
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_error_messages_are_one_line(tmp_path):
    _tree(tmp_path, {"only": 2})
    with pytest.raises(EdgetlError) as info:
        scan_dataset(tmp_path)
    assert "\n" not in str(info.value)


def test_hidden_files_and_other_extensions_are_ignored(tmp_path):
    _tree(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "._resource_fork.jpg").write_bytes(b"junk")
    (tmp_path / "a" / "readme.txt").write_text("x")
    _img(tmp_path / "a" / "UPPER.PNG")
    (tmp_path / ".git").mkdir()
    splits = scan_dataset(tmp_path, val_split=0.25)
    assert splits.classes == ["a", "b"]
    assert len(splits.train) + len(splits.val) == 7
    assert not splits.skipped


def test_val_class_missing_from_train_is_an_error(tmp_path):
    _tree(tmp_path / "train", {"a": 2, "b": 2})
    _tree(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match="zebra"):
        scan_dataset(tmp_path)


def test_train_val_test_folders(tmp_path):
    _tree(tmp_path / "train", {"a": 4, "b": 3})
    _tree(tmp_path / "validation", {"a": 2, "b": 2})
    _tree(tmp_path / "test", {"a": 1, "b": 1})
    splits = scan_dataset(tmp_path)
    assert splits.source == "folders"
    assert splits.class_counts("train") == {"a": 4, "b": 3}
    assert splits.class_counts("val") == {"a": 2, "b": 2}
    assert splits.class_counts("test") == {"a": 1, "b": 1}
    assert all(p.parent.parent.name == "test" for p, _ in splits.test)


# --- splits ---------------------------------------------------------------------------------------


def test_stratified_split_is_seeded_and_keeps_every_class_in_val(tmp_path):
    _tree(tmp_path, {"a": 20, "b": 10, "c": 3, "d": 2})  # d: round(0.4) = 0, but val keeps one
    s1 = scan_dataset(tmp_path, val_split=0.2, seed=1)
    s2 = scan_dataset(tmp_path, val_split=0.2, seed=1)
    s3 = scan_dataset(tmp_path, val_split=0.2, seed=2)
    assert s1.source == "split"
    assert s1.val == s2.val and s1.train == s2.train
    assert s1.val != s3.val
    assert s1.class_counts("val") == {"a": 4, "b": 2, "c": 1, "d": 1}
    assert s1.class_counts("train") == {"a": 16, "b": 8, "c": 2, "d": 1}
    assert not set(s1.train) & set(s1.val)
    assert len(s1.train) + len(s1.val) == 35


def test_a_class_with_one_image_stays_in_train(tmp_path, caplog):
    _tree(tmp_path, {"a": 10, "b": 1})
    with caplog.at_level(logging.WARNING, logger="edgetl.data"):
        splits = scan_dataset(tmp_path, val_split=0.2)
    assert splits.class_counts("train") == {"a": 8, "b": 1}
    assert splits.class_counts("val") == {"a": 2, "b": 0}
    assert "without validation images" in caplog.text and "b" in caplog.text


def test_test_split_is_a_fraction_of_all_images_taken_first(tmp_path):
    _tree(tmp_path, {"a": 20, "b": 20})
    splits = scan_dataset(tmp_path, val_split=0.2, test_split=0.2, seed=0)
    assert splits.class_counts("test") == {"a": 4, "b": 4}  # 0.2 of all 40, not of the validation set
    assert splits.class_counts("val") == {"a": 4, "b": 4}
    assert splits.class_counts("train") == {"a": 12, "b": 12}
    everything = splits.train + splits.val + splits.test
    assert len(set(everything)) == 40
    summary = splits.summary()
    assert summary["sizes"] == {"train": 24, "val": 8, "test": 8}
    assert summary["test_split"] == {"requested": 0.2, "fraction": 0.2, "reason": summary["test_split"]["reason"]}


@pytest.mark.parametrize("counts", [{"a": 37, "b": 23, "c": 41}, {"a": 100, "b": 9, "c": 3}])
def test_test_split_holds_out_its_fraction_disjoint_and_stable(tmp_path, counts):
    _tree(tmp_path, counts)
    n = sum(counts.values())
    s1 = scan_dataset(tmp_path, val_split=0.2, test_split=0.2, seed=7)
    assert abs(len(s1.test) - round(0.2 * n)) <= len(counts)
    assert not set(s1.test) & (set(s1.train) | set(s1.val))
    assert len(s1.train) + len(s1.val) + len(s1.test) == n
    assert all(n >= 1 for n in s1.class_counts("train").values())
    again = scan_dataset(tmp_path, val_split=0.2, test_split=0.2, seed=7)
    assert (again.train, again.val, again.test) == (s1.train, s1.val, s1.test)
    other = scan_dataset(tmp_path, val_split=0.2, test_split=0.2, seed=8)
    assert set(other.test) != set(s1.test)


def test_test_split_does_not_move_the_validation_split_without_it(tmp_path):
    _tree(tmp_path, {"a": 20, "b": 10})
    plain = scan_dataset(tmp_path, val_split=0.2, test_split=0.0, seed=3)
    auto = scan_dataset(tmp_path, val_split=0.2, seed=3)  # too small for the automatic test split
    assert not plain.test and not auto.test
    assert (plain.train, plain.val) == (auto.train, auto.val)
    assert "too few" in auto.test_choice.reason and "'b'" in auto.test_choice.reason


def test_auto_test_split_holds_out_a_tenth_when_every_class_can_afford_it(tmp_path, caplog):
    _tree(tmp_path, {"a": 60, "b": 50})
    with caplog.at_level(logging.INFO, logger="edgetl.data"):
        splits = scan_dataset(tmp_path, val_split=0.2, seed=0)
    assert splits.class_counts("test") == {"a": 6, "b": 5}
    assert splits.class_counts("val") == {"a": 12, "b": 10}  # 0.2 of all the images, from the rest
    assert splits.summary()["test_split"]["requested"] == "auto"
    assert splits.summary()["test_split"]["fraction"] == 0.1
    assert "test split: 0.1 of each class" in caplog.text


def test_auto_test_split_leaves_a_small_class_alone_and_says_why(tmp_path, caplog):
    _tree(tmp_path, {"a": 60, "b": 44})  # b: round(4.4) = 4 test images, fewer than 5
    with caplog.at_level(logging.INFO, logger="edgetl.data"):
        splits = scan_dataset(tmp_path)
    assert not splits.test and splits.summary()["test_split"]["fraction"] == 0.0
    assert "class 'b' has 44 images" in caplog.text


def test_a_given_test_set_is_used_as_given(tmp_path, caplog):
    _tree(tmp_path / "train", {"a": 60, "b": 60})
    _tree(tmp_path / "test", {"a": 2, "b": 3})
    with caplog.at_level(logging.INFO, logger="edgetl.data"):
        splits = scan_dataset(tmp_path, test_split=0.3)
    assert splits.class_counts("test") == {"a": 2, "b": 3}
    assert splits.class_counts("val") == {"a": 12, "b": 12}
    assert "used as given" in caplog.text and "not applied" in caplog.text


def test_train_and_val_folders_get_no_automatic_test_split(tmp_path):
    _tree(tmp_path / "train", {"a": 60, "b": 60})
    _tree(tmp_path / "val", {"a": 10, "b": 10})
    auto = scan_dataset(tmp_path)
    assert not auto.test and "own train and val" in auto.test_choice.reason
    asked = scan_dataset(tmp_path, test_split=0.1)  # 0.1 of all 70 per class, taken from train/
    assert asked.class_counts("test") == {"a": 7, "b": 7}
    assert asked.class_counts("val") == {"a": 10, "b": 10}
    assert all(p.parent.parent.name == "train" for p, _ in asked.test)


def test_csv_test_rows_are_the_test_set(tmp_path):
    lines = []
    for i in range(60):
        _img(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{'cat' if i % 2 else 'dog'},{'test' if i < 4 else ''}")
    (tmp_path / "l.csv").write_text("\n".join(lines))
    splits = scan_dataset(tmp_path / "l.csv")
    assert sorted(p.name for p, _ in splits.test) == ["0.png", "1.png", "2.png", "3.png"]


def test_train_folder_only_holds_out_val(tmp_path):
    _tree(tmp_path / "train", {"a": 10, "b": 10})
    splits = scan_dataset(tmp_path, val_split=0.3)
    assert splits.class_counts("val") == {"a": 3, "b": 3}


def test_bad_split_fractions(tmp_path):
    _tree(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DataError, match="val_split"):
        scan_dataset(tmp_path, val_split=1.5)
    with pytest.raises(DataError, match="test_split"):
        scan_dataset(tmp_path, test_split=1.0)
    with pytest.raises(DataError, match="val_split \\+ test_split"):
        scan_dataset(tmp_path, val_split=0.5, test_split=0.5)
    with pytest.raises(UnknownNameError, match="on_bad_image"):
        scan_dataset(tmp_path, on_bad_image="ignore")


def test_imbalance_is_reported(tmp_path, caplog):
    _tree(tmp_path / "train", {"big": 20, "small": 4})
    _tree(tmp_path / "val", {"big": 2, "small": 2})
    with caplog.at_level(logging.WARNING, logger="edgetl.data"):
        splits = scan_dataset(tmp_path)
    assert "imbalance 5.0x" in caplog.text and "big" in caplog.text
    assert splits.summary()["imbalance_ratio"] == 5.0
    assert splits.summary()["class_counts"]["train"] == {"big": 20, "small": 4}


# --- CSV ------------------------------------------------------------------------------------------


def test_csv_with_header_and_split_column(tmp_path):
    for i in range(6):
        _img(tmp_path / "imgs" / f"{i}.png")
    rows = ["filepath,label,split"] + [
        f"imgs/{i}.png,{'cat' if i % 2 else 'dog'},{'val' if i >= 4 else 'train'}" for i in range(6)
    ]
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    splits = scan_dataset(csv_file)
    assert splits.source == "csv"
    assert splits.classes == ["cat", "dog"]
    assert len(splits.train) == 4 and len(splits.val) == 2
    assert all(p.is_absolute() and p.exists() for p, _ in splits.train)
    assert (tmp_path / "imgs" / "5.png", 0) in splits.val


def test_csv_without_header_is_split_by_val_split(tmp_path):
    sub = tmp_path / "data"
    lines = []
    for i in range(10):
        _img(sub / "x" / f"{i}.jpg", fmt="JPEG")
        lines.append(f"x/{i}.jpg,{i % 2}")
    (sub / "list.csv").write_text("\n".join(lines))
    splits = scan_dataset(sub / "list.csv", val_split=0.2, seed=3)
    assert splits.classes == ["0", "1"]
    assert splits.class_counts("val") == {"0": 1, "1": 1}
    assert len(splits.train) == 8


def test_csv_numeric_labels_sort_numerically(tmp_path):
    lines = []
    for i in range(12):
        _img(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{[2, 10, 1][i % 3]}")
    (tmp_path / "l.csv").write_text("\n".join(lines))
    assert scan_dataset(tmp_path / "l.csv").classes == ["1", "2", "10"]


def test_csv_missing_path_names_the_row(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    (tmp_path / "l.csv").write_text("path,label\na.png,x\nb.png,y\nmissing.png,y\n")
    with pytest.raises(DataError, match=r"row 4: image 'missing\.png' does not exist"):
        scan_dataset(tmp_path / "l.csv")


def test_csv_bad_rows(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    (tmp_path / "s.csv").write_text("a.png,x,train\nb.png,y,holdout\n")
    with pytest.raises(DataError, match=r"row 2: unknown split 'holdout'"):
        scan_dataset(tmp_path / "s.csv")
    (tmp_path / "c.csv").write_text("a.png,x\nb.png\n")
    with pytest.raises(DataError, match=r"row 2: expected path,label"):
        scan_dataset(tmp_path / "c.csv")
    (tmp_path / "e.csv").write_text("path,label\n")
    with pytest.raises(DataError, match="no rows"):
        scan_dataset(tmp_path / "e.csv")
    (tmp_path / "one.csv").write_text("a.png,x\nb.png,x\n")
    with pytest.raises(DataError, match="only one class"):
        scan_dataset(tmp_path / "one.csv")


# --- the same image twice: links and byte-identical copies ----------------------------------------


def _first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


@pytest.mark.parametrize("link", [os.symlink, os.link], ids=["symlink", "hard-link"])
def test_a_link_to_another_class_is_refused_naming_both(tmp_path, link):
    data = _tree(tmp_path / "data", {"a": 3, "b": 3})
    link(_first(data / "b"), data / "a" / "stolen.png")
    with pytest.raises(DataError) as info:
        scan_dataset(data)
    assert re.fullmatch(r"\S*/b/b_000\.png \(class 'b'\) is the same file as \S*/a/stolen\.png \(class 'a'\), "
                        r"through a link or a repeated row; an image has one label: remove one of them",
                        str(info.value)), info.value


@pytest.mark.parametrize("link", [os.symlink, os.link], ids=["symlink", "hard-link"])
def test_a_link_across_splits_is_refused(tmp_path, link):
    _tree(tmp_path / "train", {"a": 3, "b": 3})
    _tree(tmp_path / "val", {"a": 2, "b": 2})
    link(_first(tmp_path / "val" / "a"), tmp_path / "train" / "a" / "leak.png")
    with pytest.raises(DataError, match=r"val/a/a_000\.png \(val\) is the same file as \S*leak\.png \(train\), "
                                        r"through a link or a repeated row; an image in two splits"):
        scan_dataset(tmp_path)


@pytest.mark.parametrize("link", [os.symlink, os.link], ids=["symlink", "hard-link"])
def test_a_link_in_its_own_class_is_used_once_with_a_warning(tmp_path, caplog, link):
    data = _tree(tmp_path / "data", {"a": 4, "b": 4})
    link(_first(data / "a"), data / "a" / "again.png")
    with caplog.at_level(logging.WARNING, logger="edgetl.data"):
        splits = scan_dataset(data, val_split=0.25, test_split=0)
    paths = [p for p, _ in splits.train + splits.val]
    assert len(paths) == 8 and _first(data / "a") in paths and data / "a" / "again.png" not in paths
    assert "1 image(s) are listed more than once" in caplog.text


def test_a_copy_in_another_class_is_refused_naming_both(tmp_path):
    data = _tree(tmp_path / "data", {"a": 3, "b": 3})
    shutil.copy(_first(data / "b"), data / "a" / "copied.png")
    with pytest.raises(DataError) as info:
        scan_dataset(data)
    assert re.fullmatch(r"\S*/b/b_000\.png \(class 'b'\) is a byte-identical copy of \S*/a/copied\.png "
                        r"\(class 'a'\); an image has one label: remove one of them", str(info.value)), info.value


@pytest.mark.parametrize("other", ["val", "test"])
def test_a_copy_in_two_given_splits_is_refused(tmp_path, other):
    _tree(tmp_path / "train", {"a": 3, "b": 3})
    _tree(tmp_path / other, {"a": 2, "b": 2})
    shutil.copy(_first(tmp_path / other / "b"), tmp_path / "train" / "b" / "copy.png")
    with pytest.raises(DataError, match=rf"{other}/b/b_000\.png \({other}\) is a byte-identical copy of "
                                        r"\S*train/b/copy\.png \(train\); an image in two splits .*remove one"):
        scan_dataset(tmp_path)


def test_csv_copies_with_two_labels_or_in_two_splits_are_refused(tmp_path):
    for name in "abcd":
        _img(tmp_path / f"{name}.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "a2.png")
    refused = {
        "a.png,cat,train\na2.png,dog,train": r"a2\.png \(class 'dog'\) is a byte-identical copy of \S*a\.png "
                                             r"\(class 'cat'\); an image has one label",
        "a.png,cat,train\na2.png,cat,val": r"a2\.png \(val\) is a byte-identical copy of \S*a\.png \(train\); "
                                           r"an image in two splits",
        "a.png,cat,train\na2.png,cat,": r"a2\.png \(unsplit\) is a byte-identical copy of \S*a\.png \(train\)",
    }
    for rows, message in refused.items():
        (tmp_path / "l.csv").write_text(rows + "\nb.png,cat,train\nc.png,dog,train\nd.png,dog,val\n")
        with pytest.raises(DataError, match=message):
            scan_dataset(tmp_path / "l.csv")


def test_copies_in_one_given_split_are_used_once_with_a_warning(tmp_path, caplog):
    _tree(tmp_path / "train", {"a": 4, "b": 4})
    _tree(tmp_path / "val", {"a": 2, "b": 2})
    first = _first(tmp_path / "train" / "a")
    copies = [Path(shutil.copy(first, first.with_name(f"copy{i}.png"))) for i in range(2)]
    copies.append(Path(shutil.copy(_first(tmp_path / "val" / "b"), tmp_path / "val" / "b" / "copy.png")))
    with caplog.at_level(logging.WARNING, logger="edgetl.data"):
        splits = scan_dataset(tmp_path)
    assert splits.class_counts("train") == {"a": 4, "b": 4} and splits.class_counts("val") == {"a": 2, "b": 2}
    used = [p for p, _ in splits.train + splits.val]
    assert first in used and not set(copies) & set(used)
    assert "3 image(s) are byte-identical copies of another image in the same split" in caplog.text
    assert all(p.is_file() for p in copies)  # left out of the dataset, never removed from the disk


@pytest.mark.parametrize("source", ["folders", "csv"])
def test_copies_that_edgetl_splits_stay_in_one_split(tmp_path, caplog, source):
    data = _tree(tmp_path / "data", {"a": 20, "b": 20})
    originals = sorted((data / "a").iterdir())[:6] + sorted((data / "b").iterdir())[:2]
    groups = [[o, *(Path(shutil.copy(o, o.with_name(f"{o.stem}-copy{j}.png"))) for j in range(2))] for o in originals]
    target = data
    if source == "csv":
        target = tmp_path / "labels.csv"
        target.write_text("".join(f"data/{p.parent.name}/{p.name},{p.parent.name}\n" for p in data.rglob("*.png")))
    held_out = 0
    for seed in range(4):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgetl.data"):
            splits = scan_dataset(target, val_split=0.25, test_split=0.2, seed=seed)
        where = {p: split for split in SPLITS for p, _ in splits.records(split)}
        assert len(where) == 56  # every copy is used
        assert all(len({where[p] for p in group}) == 1 for group in groups), seed
        held_out += sum(where[group[0]] != "train" for group in groups)
        assert "16 image(s) are byte-identical copies of another image of their class" in caplog.text
    assert held_out  # some copies were held out together, not only left in train


def test_the_seeded_split_without_copies_is_pinned_and_copies_move_no_other_class(tmp_path):
    _tree(tmp_path, {"a": 9, "b": 7})

    def names(split_name: str) -> list[str]:
        return sorted(p.name for p, _ in splits.records(split_name))

    splits = scan_dataset(tmp_path, val_split=0.2, test_split=0.2, seed=0)
    assert names("train") == ["a_000.png", "a_003.png", "a_004.png", "a_005.png", "a_007.png", "b_001.png",
                              "b_002.png", "b_003.png", "b_004.png", "b_006.png"]
    assert names("val") == ["a_001.png", "a_002.png", "b_005.png"]
    assert names("test") == ["a_006.png", "a_008.png", "b_000.png"]
    before = {s: [n for n in names(s) if n.startswith("a_")] for s in SPLITS}
    shutil.copy(tmp_path / "b" / "b_001.png", tmp_path / "b" / "b_001-copy.png")
    splits = scan_dataset(tmp_path, val_split=0.2, test_split=0.2, seed=0)
    assert {s: [n for n in names(s) if n.startswith("a_")] for s in SPLITS} == before


def test_same_bytes_reads_only_files_whose_size_another_has(tmp_path, monkeypatch):
    big = np.random.default_rng(0).integers(0, 256, 3 * HEAD_BYTES, dtype=np.uint8).tobytes()
    contents = {"one": b"x" * 10, "two": b"y" * 11, "big": big, "same": big, "tail": big[:-1] + b"\0",
                "head": b"\0" + big[1:], "empty": b"", "empty2": b""}
    paths = []
    for name, content in contents.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(content)
    read: list[tuple[str, str]] = []
    for step in ("_head_digest", "_full_digest"):
        real = getattr(duplicates, step)
        monkeypatch.setattr(duplicates, step, lambda p, real=real, step=step: read.append((step, Path(p).name))
                            or real(p))
    assert big[-1] != 0 and big[0] != 0
    assert same_bytes(paths) == [[2, 3]]
    assert sorted(read) == [("_full_digest", "big"), ("_full_digest", "same"), ("_full_digest", "tail"),
                            ("_head_digest", "big"), ("_head_digest", "head"), ("_head_digest", "same"),
                            ("_head_digest", "tail")]


# --- transforms -----------------------------------------------------------------------------------


def test_eval_transform_matches_preprocess(tmp_path):
    tf = build_transform(PRE)
    img = Image.new("RGB", (50, 70), (255, 128, 0))
    x = tf(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = (torch.tensor([255, 128, 0]) / 255.0 - torch.tensor(PRE.mean)) / torch.tensor(PRE.std)
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-4)
    assert torch.allclose(x[:, 0, 0], expected, atol=1e-4)

    assert build_transform(PRE, resolution=24)(img).shape == (3, 24, 24)

    class Card:
        preprocess = PRE

    assert build_transform(Card())(img).shape == (3, 32, 32)


def test_eval_transform_resizes_shorter_side_then_center_crops():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :20] = 255  # a white band on the left, outside the centre crop
    x = build_transform(PRE)(Image.fromarray(arr))
    white = (1 - torch.tensor(PRE.mean)) / torch.tensor(PRE.std)
    assert not torch.isclose(x[:, 16, 0], white, atol=1e-3).all()


def test_train_transform_none_is_the_eval_transform_and_augment_changes_images():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    eval_tf = build_transform(PRE)
    none_tf = build_transform(PRE, train=True, augment="none")
    assert torch.equal(eval_tf(img), none_tf(img))
    for augment in ("light", "strong"):
        tf = build_transform(PRE, train=True, augment=augment)
        torch.manual_seed(0)
        a, b = tf(img), tf(img)
        assert a.shape == (3, 32, 32)
        assert not torch.equal(a, b)
    with pytest.raises(UnknownNameError, match="did you mean 'strong'"):
        build_transform(PRE, train=True, augment="strng")


def test_tensor_pipeline_evaluates_exactly_as_the_pil_transform():
    rng = np.random.default_rng(1)
    for size in ((50, 70), (30, 20), (41, 41)):
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        prepare, tf = build_tensor_pipeline(PRE)
        assert torch.equal(tf(prepare(img)), build_transform(PRE)(img)), size


def test_tensor_pipeline_train_step_is_seeded_and_augments():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    for augment in ("light", "strong"):
        prepare, tf = build_tensor_pipeline(PRE, train=True, augment=augment)
        stored = prepare(img)
        assert stored.dtype == torch.uint8 and min(stored.shape[1:]) < 90  # shrunk once, to what crops need
        assert min(stored.shape[1:]) >= 32 / (0.5 if augment == "light" else 0.2) ** 0.5
        torch.manual_seed(0)
        a = tf(stored)
        torch.manual_seed(0)
        assert torch.equal(a, tf(stored)) and a.shape == (3, 32, 32) and a.dtype == torch.float32
        assert not torch.equal(a, tf(stored))
    small = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    assert build_tensor_pipeline(PRE, train=True)[0](small).shape == (3, 20, 30)  # never enlarged


def test_decoded_store_gives_the_batches_of_decoding_every_epoch(tmp_path, caplog):
    trunc, garbage = _dataset_with_bad_files(tmp_path)
    splits = scan_dataset(tmp_path, check="none", seed=0)
    prepare, tf = build_tensor_pipeline(PRE, train=True, augment="light")
    store = DecodedStore.build(splits.train, prepare)
    good = [r for r, t in zip(splits.train, store.images, strict=True) if t is not None]
    assert store.nbytes == estimate_bytes(good, prepare.stored_shape)  # the headers predict the memory
    assert sum(t is None for t in store.images) == sum(p in (trunc, garbage) for p, _ in splits.train)

    def epochs(**kwargs):
        loader = make_loader(splits.train, tf, batch_size=4, shuffle=True, seed=3, prepare=prepare, **kwargs)
        out = []
        for epoch in range(2):
            loader.dataset.set_epoch(epoch)
            out.append([(x.clone(), y.clone()) for x, y in loader])
        return out, loader

    with caplog.at_level(logging.WARNING, logger="edgetl.data"):
        cached, loader = epochs(store=store)
    warnings = caplog.text
    decoded, _ = epochs()
    for a, b in zip(cached, decoded, strict=True):
        assert len(a) == len(b)
        assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True))
    assert not torch.equal(cached[0][0][0], cached[1][0][0])  # each epoch draws new crops
    bad = {p for p, _ in loader.skipped}
    for path in bad:
        assert warnings.count(path.name) == 1  # reported once by name, not once per epoch


# --- loaders --------------------------------------------------------------------------------------


def test_loader_batches_and_labels(tmp_path):
    _tree(tmp_path, {"a": 5, "b": 5})
    splits = scan_dataset(tmp_path, val_split=0.2)
    loader = make_loader(splits.train, build_transform(PRE), batch_size=3, shuffle=True, seed=0)
    assert not loader.persistent_workers and not loader.pin_memory
    batches = list(loader)
    assert batches[0][0].shape == (3, 3, 32, 32) and batches[0][1].dtype == torch.int64
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(y for _, y in splits.train)
    again = torch.cat([y for _, y in make_loader(splits.train, build_transform(PRE), 3, True, seed=0)])
    assert torch.equal(torch.cat([y for _, y in batches]), again)
    with pytest.raises(DataError, match="empty"):
        make_loader([], build_transform(PRE), 2, False)


def test_balance_gives_a_weighted_sampler(tmp_path):
    _tree(tmp_path / "train", {"big": 30, "small": 3})
    _tree(tmp_path / "val", {"big": 1, "small": 1})
    splits = scan_dataset(tmp_path)
    loader = make_loader(splits.train, build_transform(PRE), 8, shuffle=True, balance=True, seed=0)
    assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler)
    assert len(loader.sampler) == len(splits.train)
    drawn = Counter()
    for _ in range(6):
        drawn.update(splits.train[i][1] for i in loader.sampler)
    assert 0.35 < drawn[1] / sum(drawn.values()) < 0.65  # ~1/11 without balancing
    with pytest.raises(ValueError):
        make_loader(splits.train, build_transform(PRE), 8, True, balance=True, sampler=loader.sampler)


# --- demo dataset ---------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_demo_dataset_layout_and_determinism(tmp_path):
    a = make_demo_dataset(tmp_path / "a", num_classes=3, train_per_class=4, val_per_class=2, test_per_class=1)
    b = make_demo_dataset(tmp_path / "b", num_classes=3, train_per_class=4, val_per_class=2, test_per_class=1)
    c = make_demo_dataset(tmp_path / "c", num_classes=3, train_per_class=4, val_per_class=2, test_per_class=1, seed=1)
    assert a == tmp_path / "a"
    files = _files(a)
    assert files == _files(b)
    assert files != _files(c)
    assert len(set(files.values())) == len(files)  # no two images alike
    splits = scan_dataset(a)
    assert splits.source == "folders"
    assert splits.classes == sorted(DEMO_TEXTURES[:3])
    assert splits.class_counts("train") == dict.fromkeys(splits.classes, 4)
    assert splits.class_counts("val") == dict.fromkeys(splits.classes, 2)
    assert splits.class_counts("test") == dict.fromkeys(splits.classes, 1)
    with Image.open(next(a.rglob("*.png"))) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind


def test_demo_dataset_shapes_and_reuse(tmp_path):
    root = make_demo_dataset(tmp_path / "s", num_classes=8, train_per_class=1, val_per_class=0, size=32, kind="shapes")
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(DEMO_SHAPES)
    assert not (root / "val").exists()
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    make_demo_dataset(tmp_path / "s", num_classes=8, train_per_class=1, val_per_class=0, size=32, kind="shapes")
    assert stamp == {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}  # reused, not rewritten
    make_demo_dataset(tmp_path / "s", num_classes=2, train_per_class=2, val_per_class=1, size=32, kind="shapes")
    assert sorted(p.name for p in (root / "train").iterdir()) == ["circle", "square"]  # replaced


def test_demo_dataset_refuses_foreign_folders_and_bad_parameters(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not an edgetl demo dataset"):
        make_demo_dataset(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    with pytest.raises(DataError, match="num_classes"):
        make_demo_dataset(tmp_path / "x", num_classes=1)
    with pytest.raises(UnknownNameError, match="kind"):
        make_demo_dataset(tmp_path / "x", kind="faces")


def test_demo_dataset_into_existing_empty_folder(tmp_path):
    root = make_demo_dataset(tmp_path, num_classes=2, train_per_class=2, val_per_class=1, size=16)
    assert isinstance(scan_dataset(root), DatasetSplits)
