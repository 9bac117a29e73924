import numpy as np
import pytest
from PIL import Image

from montrage.components import ModelLoadError, load_components
from montrage.data import ConceptImageDataset, DataError, digits_examples, load_image, scan_concept_folder


def write_png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(path)


def test_concept_folder_scan_with_sidecar_captions(tmp_path):
    write_png(tmp_path / "cats" / "a.png")
    write_png(tmp_path / "cats" / "b.jpg")
    (tmp_path / "cats" / "b.txt").write_text("a special cat")
    write_png(tmp_path / "dogs" / "c.png", 0)
    ex = scan_concept_folder(str(tmp_path), "art by {token}")
    assert [e.id for e in ex] == ["cats/a.png", "cats/b.jpg", "dogs/c.png"]
    assert ex[0].caption == "art by cats" and ex[1].caption == "a special cat"
    ds = ConceptImageDataset(ex, 8, repeats=2)
    assert len(ds) == 6 and ds.pixels.shape == (3, 3, 8, 8)
    item = ds[4]
    assert item["index"] == 1 and item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_concept_folder(str(tmp_path / "nope"))


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no concept subfolders"):
        scan_concept_folder(str(tmp_path))


def test_concept_folder_without_images(tmp_path):
    write_png(tmp_path / "cats" / "a.png")
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="dogs.*holds no images"):
        scan_concept_folder(str(tmp_path))


def test_unreadable_image_fails_before_training(tmp_path):
    write_png(tmp_path / "cats" / "a.png")
    (tmp_path / "cats" / "broken.png").write_bytes(b"not an image at all")
    ex = scan_concept_folder(str(tmp_path))
    with pytest.raises(DataError, match="broken.png"):
        ConceptImageDataset(ex, 8)
    with pytest.raises(DataError, match="cannot read image"):
        load_image(str(tmp_path / "cats" / "broken.png"), 8)


def test_digits_examples_have_stable_ids():
    a = digits_examples([1, 7], 4)
    assert len(a) == 8 and a == digits_examples([1, 7], 4)
    assert {e.concept for e in a} == {"digit1", "digit7"} and a[0].caption == "a photo of one"
    with pytest.raises(DataError, match="only"):
        digits_examples([3], 10_000)


def test_model_path_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a diffusers text-to-image model folder"):
        load_components(str(tmp_path / "model"))
    with pytest.raises(ModelLoadError, match="could not load"):
        load_components(str(tmp_path / "no-such-model-here"))


def test_dataset_weights_oversample_one_example():
    from montrage.data import ConceptImageDataset, digits_examples

    examples = digits_examples([1, 7], 2)
    ds = ConceptImageDataset(examples, 8, repeats=2, weights=[3, 1, 1, 1])
    seen = [ds[i]["index"] for i in range(len(ds))]
    assert len(ds) == 12 and seen.count(0) == 6 and seen.count(3) == 2
    assert len(ds.pixels) == 4  # the store still sees each image once
    with pytest.raises(DataError, match="weights must be 4"):
        ConceptImageDataset(examples, 8, weights=[1, 1])
