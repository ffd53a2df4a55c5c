"""One preprocessing (``edgetl.data.preprocess``): the same tensor as torchvision's and timm's evaluation
transforms for every preprocessing of the catalog, on awkward images.

Tolerance: 1e-4 in normalised units. The pixels are identical (the same Pillow resize, the same crop box) and
the normalisation is computed in the same float32 order (``x / 255``, ``- mean``, ``/ std``), so on this
machine every kind is bitwise equal (max difference 0). The tolerance leaves room for a numpy or torch build
that vectorises differently: a few ulp of values up to ~130 (the catalog has a std of 1/255), below 2e-5.
"""

import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data as samples

from edgetl.cli import cli
from edgetl.data import build_transform, load_rgb
from edgetl.data.preprocess import (
    SCHEMA,
    PreprocessSpec,
    crop_box,
    decode,
    prepare,
    read_spec,
    resized_size,
    spec_from_document,
)
from edgetl.zoo.catalog import list_models

TOLERANCE = 1e-4
ORIENTATION = 0x0112


def _kinds():
    """One card per distinct (resize, crop, interpolation, mean, std) of the catalog."""
    kinds = {}
    for card in list_models():
        p = card.preprocess
        kinds.setdefault((p.resize_size, p.crop_size, p.interpolation, p.mean, p.std), card)
    return kinds


KINDS = _kinds()


def _photo(width, height):
    return Image.fromarray(samples.chelsea()).resize((width, height), Image.BICUBIC)


def _exif_jpeg(path, orientation):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    _photo(120, 80).save(path, exif=exif, quality=95)


def _awkward(folder):
    """Files of every kind training decodes: odd sizes, alpha, palette, 16-bit, CMYK, EXIF orientations 2-8."""
    rng = np.random.default_rng(0)
    files = {}

    def save(name, image, **kw):
        files[name] = folder / name
        image.save(files[name], **kw)

    save("photo-640x427.png", _photo(640, 427))
    save("photo-427x640.png", _photo(427, 640))
    save("noise-33x97.png", Image.fromarray(rng.integers(0, 256, (97, 33, 3), dtype=np.uint8)))
    save("noise-97x33.png", Image.fromarray(rng.integers(0, 256, (33, 97, 3), dtype=np.uint8)))
    save("pixel-1x1.png", Image.new("RGB", (1, 1), (200, 30, 90)))
    save("strip-4x45.png", Image.fromarray(rng.integers(0, 256, (45, 4, 3), dtype=np.uint8)))
    rgba = np.dstack([np.asarray(_photo(50, 40)), np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (40, 1))])
    save("alpha-50x40.png", Image.fromarray(rgba))
    save("palette-61x47.png", _photo(61, 47).convert("P", palette=Image.ADAPTIVE, colors=16), transparency=0)
    wide = (np.linspace(0, 65535, 73 * 55).reshape(55, 73)).astype(np.uint16)
    save("grey16-73x55.png", Image.fromarray(wide))
    save("cmyk-64x48.jpg", _photo(64, 48).convert("CMYK"), quality=95)
    for orientation in range(2, 9):
        files[f"exif{orientation}.jpg"] = folder / f"exif{orientation}.jpg"
        _exif_jpeg(files[f"exif{orientation}.jpg"], orientation)
    return files


SAME_GEOMETRY = {f"exif{o}.jpg" for o in (2, 3, 4, 5, 7)}
"""Decoded, they have the size of exif6.jpg or of the 120x80 photo: the per-kind parity skips them."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _awkward(tmp_path_factory.mktemp("awkward"))


@pytest.fixture(scope="module")
def decoded(corpus):
    """Each file as training decodes it."""
    return {name: load_rgb(path) for name, path in corpus.items()}


def test_the_corpus_is_awkward(corpus, decoded):
    modes = {name: Image.open(path).mode for name, path in corpus.items()}
    assert modes["grey16-73x55.png"].startswith("I;16") and modes["cmyk-64x48.jpg"] == "CMYK"
    assert modes["palette-61x47.png"] == "P" and modes["alpha-50x40.png"] == "RGBA"
    assert decoded["exif6.jpg"].size == (80, 120) and decoded["exif8.jpg"].size == (80, 120)
    assert all(image.mode == "RGB" for image in decoded.values())


def test_torchvision_integer_arithmetic():
    assert resized_size(640, 427, 256) == (383, 256)  # 383.7 truncated, where rounding gives 384
    assert resized_size(427, 640, 256) == (256, 383)
    assert resized_size(4, 45, 7) == (7, 78)
    assert crop_box(383, 256, (224, 224)) == (80, 16, 304, 240)  # (383 - 224) / 2 = 79.5: ties to even
    assert crop_box(381, 256, (224, 224)) == (78, 16, 302, 240)  # 78.5 -> 78
    assert crop_box(10, 10, (13, 12)) == (-1, -1, 11, 12)  # padded as torchvision pads: (crop - size) // 2 before


@pytest.mark.parametrize("kind", list(KINDS), ids=[f"{k[0]}-{k[1]}-{k[2]}-{KINDS[k].id}" for k in KINDS])
def test_parity_with_torchvision_eval_transform(kind, decoded, one_torch_thread):
    card = KINDS[kind]
    reference = build_transform(card.preprocess, train=False)
    spec = PreprocessSpec.from_preprocess(card.preprocess)
    for name, image in decoded.items():
        if name in SAME_GEOMETRY:
            continue
        ours, theirs = prepare(image, spec), reference(image).numpy()
        assert ours.shape == theirs.shape == (3, *spec.crop_size), name
        assert np.abs(ours - theirs).max() <= TOLERANCE, (card.id, name)


def _timm_transform(card):
    import timm.data
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(f"{card.name.split('/', 1)[1]}.{card.weights}").to_dict()
    return timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg, use_test_size=True))


TIMM_KINDS = {k: c for k, c in KINDS.items() if c.name.startswith("timm/")}


@pytest.mark.parametrize("kind", list(TIMM_KINDS), ids=[TIMM_KINDS[k].id for k in TIMM_KINDS])
def test_parity_with_timm_eval_transform(kind, decoded, one_torch_thread):
    card = TIMM_KINDS[kind]
    reference = _timm_transform(card)
    spec = PreprocessSpec.from_preprocess(card.preprocess)
    for name in ("photo-640x427.png", "photo-427x640.png", "noise-33x97.png", "strip-4x45.png", "exif6.jpg"):
        ours, theirs = prepare(decoded[name], spec), reference(decoded[name]).numpy()
        assert np.abs(ours - theirs).max() <= TOLERANCE, (card.id, name)


def test_decode_of_a_file_and_of_an_opened_image_is_trainings(corpus, decoded):
    for name, path in corpus.items():
        assert np.array_equal(np.asarray(decode(path)), np.asarray(decoded[name])), name
        with Image.open(path) as opened:
            assert np.array_equal(np.asarray(decode(opened)), np.asarray(decoded[name])), name


def test_bgr_reverses_the_channels(decoded):
    rgb = PreprocessSpec(40, (32, 32), (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    bgr = PreprocessSpec(40, (32, 32), (0.3, 0.2, 0.1), (0.5, 0.5, 0.5), color_order="BGR")
    image = decoded["photo-640x427.png"]
    assert np.array_equal(prepare(image, bgr), prepare(image, rgb)[::-1])


# --- predict and validate prepare an artifact's images the same way -------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """resnet18's ImageNet classifier with random weights at 32 px, exported in FP32."""
    from edgetl.export.api import export

    out = tmp_path_factory.mktemp("prep") / "artifact"
    return export("resnet18", out, precision="fp32", weights="none", resolution=32, rounds=2, simplify=False).path


def test_predict_and_validate_feed_the_model_the_same_tensor(artifact, corpus):
    from edgetl.export.bundle import PREPROCESS_FILE
    from edgetl.export.evaluate import image_batches
    from edgetl.predict import open_source
    from edgetl.validate import ENGINE_BATCH

    spec = read_spec(artifact / PREPROCESS_FILE)
    names = sorted(corpus)
    records = [(corpus[name], i) for i, name in enumerate(names)]
    validated = np.concatenate([x for x, _ in image_batches(records, spec, batch_size=ENGINE_BATCH)])
    classifier = open_source(artifact)
    try:
        predicted = np.stack([classifier.transform(decode(corpus[name])) for name in names])
    finally:
        classifier.close()
    assert np.array_equal(predicted, validated)
    trained = build_transform(_card("resnet18").preprocess, 32, train=False)
    for name, x in zip(names, predicted, strict=True):
        assert np.abs(x - trained(load_rgb(corpus[name])).numpy()).max() <= TOLERANCE, name
    plain = prepare(Image.open(corpus["exif6.jpg"]).convert("RGB"), spec)  # what predict did before
    assert np.abs(plain - predicted[names.index("exif6.jpg")]).max() > 0.5


def test_predicted_probabilities_are_validates(artifact, corpus):
    from edgetl.export.bundle import MODEL_FILE, PREPROCESS_FILE
    from edgetl.export.evaluate import image_batches
    from edgetl.predict import _softmax, predict
    from edgetl.runtime.onnxruntime import OnnxRuntimeRunner

    names = ["exif6.jpg", "exif8.jpg", "grey16-73x55.png", "cmyk-64x48.jpg", "alpha-50x40.png", "photo-640x427.png"]
    spec = read_spec(artifact / PREPROCESS_FILE)
    (x, _), = image_batches([(corpus[n], 0) for n in names], spec, batch_size=len(names))
    with OnnxRuntimeRunner(artifact / MODEL_FILE, providers="cpu") as runner:
        probs = _softmax(np.asarray(runner.infer(x)["logits"]))
    for row, prediction in zip(probs, predict(artifact, [corpus[n] for n in names], top=5), strict=True):
        assert list(prediction.indices) == list(np.argsort(-row, kind="stable")[:5]), prediction.image
        np.testing.assert_allclose(prediction.probabilities, row[list(prediction.indices)], rtol=1e-4, atol=0)


# --- preprocess.json: each fact once, validated when read -----------------------------------------


def _card(name):
    return next(c for c in list_models(name) if c.is_default)


def _rewrite(folder, change):
    """Edit preprocess.json, then re-hash the artifact as export would, so that only validation can tell."""
    from edgetl.export import bundle

    doc = json.loads((folder / bundle.PREPROCESS_FILE).read_text())
    change(doc)
    (folder / bundle.PREPROCESS_FILE).write_text(json.dumps(doc))
    bundle.write_manifest(folder, json.loads((folder / bundle.MANIFEST_FILE).read_text()))


BAD = {
    "scale-nan": (lambda d: d.update(scale=float("nan")), r"'scale' must be a finite number > 0, got NaN"),
    "std-zero": (lambda d: d.update(std=[0, 0, 0]), r"'std' must be three finite numbers > 0, got \[0, 0, 0\]"),
    "mean-one": (lambda d: d.update(mean=[0.5]), r"'mean' must be three finite numbers, got \[0\.5\]"),
    "resize-huge": (lambda d: d["resize"].update(size=100000), r"'resize\.size' must be a whole number of pixels"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_preprocess_json_is_refused_by_predict_and_validate(case, artifact, corpus, tmp_path):
    change, message = BAD[case]
    folder = tmp_path / "artifact"
    shutil.copytree(artifact, folder)
    _rewrite(folder, change)
    for args in (["predict", str(folder), str(corpus["exif6.jpg"])], ["validate", str(folder)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and re.search(message, lines[0]) and "preprocess.json" in lines[0], result.stderr


def test_export_writes_each_fact_once(artifact):
    doc = json.loads((artifact / "preprocess.json").read_text())
    assert doc["schema"] == SCHEMA and "preprocess" not in doc and "input_shape" not in doc
    spec = spec_from_document(doc)
    assert spec == PreprocessSpec.from_preprocess(_card("resnet18").preprocess, 32)
    assert spec.to_document() == doc


def test_schema_1_is_read_once_and_its_copies_must_agree(artifact):
    doc = PreprocessSpec.from_preprocess(_card("resnet18").preprocess, 32).to_document()
    old = {**{k: doc[k] for k in ("scale", "mean", "std", "color_order", "layout", "dtype", "formula")},
           "resize": {"size": 37, "edge": "shorter", "interpolation": "bilinear", "antialias": True},
           "crop": {"size": [32, 32], "mode": "center"}, "input_shape": [1, 3, 32, 32],
           "preprocess": {"resize_size": 37, "crop_size": 32, "mean": doc["mean"], "std": doc["std"],
                          "interpolation": "bilinear", "layout": "NCHW", "color_order": "RGB", "scale": doc["scale"]}}
    assert spec_from_document(old) == spec_from_document(doc)
    old.update(color_order="BGR", mean=[0, 0, 0])  # the top-level copy only: firmware and validate disagreed
    with pytest.raises(ValueError, match=r"'preprocess\.mean' must be equal to the top-level 'mean'"):
        spec_from_document(old)


@pytest.mark.parametrize(("change", "field"), [
    (lambda d: d.update(schema=3), "schema"),
    (lambda d: d.update(colour_order="RGB"), "colour_order"),
    (lambda d: d.update(color_order="RGBA"), "color_order"),
    (lambda d: d.update(layout="NHWC"), "layout"),
    (lambda d: d["resize"].update(interpolation="cubic"), "resize.interpolation"),
    (lambda d: d["crop"].update(size=[32]), "crop.size"),
    (lambda d: d["crop"].update(size=[0, 32]), "crop.size"),
    (lambda d: d.update(std=[1, float("inf"), 1]), "std"),
    (lambda d: d.update(mean=["0.5", 0.5, 0.5]), "mean"),
    (lambda d: d.update(scale=True), "scale"),
])
def test_every_field_is_checked(change, field):
    doc = PreprocessSpec.from_preprocess(_card("resnet18").preprocess).to_document()
    change(doc)
    with pytest.raises(ValueError, match=f"'{re.escape(field)}' must be"):
        spec_from_document(doc)
