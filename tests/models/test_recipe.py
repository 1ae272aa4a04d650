"""One recipe: the generator's training images and the service's network input are the same tensor."""

from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pytest
import torch

from models import recipe as recipes
from models.data.synth import _render_with_raw
from models.registry import get_config
from models.train.data import resize_pair
from service.config import LimitSettings
from service.evaluation import ct_dicom
from service.inputs import decode
from service.worker.preprocess import plan, prepared

CONFIG = get_config("c2p-femto-192")
# The training images are stored as 8-bit PNGs: half a grey level of rounding, before and after the resize.
ATOL = (1.0 / 255) / min(CONFIG.std)


def training_tensor(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What the trainer feeds: PNG pixels -> layout's [0, 1] -> the recipe's resize -> the model's normalise."""
    unit = image.astype(np.float32) / 255
    unit = np.repeat(unit[..., None], 3, axis=2) if unit.ndim == 2 else unit
    pixels, _ = resize_pair(unit, mask, CONFIG.input_size, letterbox=True)
    x = pixels.float()[None] / 255
    mean = torch.tensor(CONFIG.mean).view(1, 3, 1, 1)
    std = torch.tensor(CONFIG.std).view(1, 3, 1, 1)
    return ((x - mean) / std)[0].numpy()


def served_tensor(files: list[tuple[str, bytes]], modality: str | None) -> np.ndarray:
    volume = decode(files, LimitSettings(), modality)
    (tensor,) = prepared(volume, plan(volume, CONFIG.input_size), CONFIG.mean, CONFIG.std)
    assert tensor is not None
    return tensor


def nifti(raw: np.ndarray) -> bytes:
    return nib.Nifti1Image(np.ascontiguousarray(raw.T[..., None]), np.eye(4)).to_bytes()


@pytest.mark.parametrize(
    ("task", "units"), [("ct_lesion", "CT"), ("ct_lung_infection", "CT"), ("mr_brain_lesion", "MR")]
)
def test_a_scan_through_the_service_gives_the_training_tensor(task: str, units: str) -> None:
    index = next(i for i in range(10) if _render_with_raw(task, 0, "test", i, 256)[1].any())
    image, mask, meta, raw = _render_with_raw(task, 0, "test", index, 256)
    assert raw is not None and meta["units"] == units
    trained = training_tensor(image, mask)
    forms = [("case.nii", nifti(raw.astype(np.int16) if units == "CT" else raw))]
    if units == "CT":
        forms.append(("case.dcm", ct_dicom(raw)))
    for name, data in forms:
        served = served_tensor([(name, data)], units)
        assert served.shape == trained.shape == (3, CONFIG.input_size, CONFIG.input_size)
        np.testing.assert_allclose(served, trained, atol=ATOL * 1.5, err_msg=f"{task} as {name}")


def test_a_picture_through_the_service_gives_the_training_tensor() -> None:
    from PIL import Image

    for task in ("thyroid_us_nodule", "dermoscopy_lesion"):
        image, mask, _ = _render_with_raw(task, 0, "test", 1, 256)[:3]
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        served = served_tensor([("case.png", buffer.getvalue())], None)
        np.testing.assert_allclose(served, training_tensor(image, mask), atol=ATOL * 1.5)


def test_the_recipe_round_trips_through_the_card_and_refuses_what_it_cannot_apply() -> None:
    recipe = recipes.Recipe(ct_window=(40.0, 400.0), percentiles=(1.0, 99.0))
    assert recipes.Recipe.from_card(recipe.to_card()) == recipe
    assert recipes.Recipe.from_card(None) == recipes.Recipe(resize=recipes.STRETCH, version=1)  # before recipes
    assert recipes.Recipe.from_card({**recipe.to_card(), "version": 1}).resize == recipes.STRETCH
    with pytest.raises(ValueError, match="version"):
        recipes.Recipe.from_card({**recipe.to_card(), "version": 99})
    bad = recipe.to_card()
    bad["ct"]["window"] = [40, -1]
    with pytest.raises(ValueError, match="out of range"):
        recipes.Recipe.from_card(bad)


def test_the_shipped_card_states_its_recipe() -> None:
    import json

    from models.files import WEIGHTS_DIR

    card = json.loads((WEIGHTS_DIR / "c2p-femto-192.export.json").read_text())
    weights = json.loads((WEIGHTS_DIR / "c2p-femto-192.json").read_text())
    assert card["input"]["recipe"] == weights["recipe"]  # what it was trained by is what the service applies
    assert recipes.Recipe.from_card(card["input"]["recipe"]) == recipes.Recipe()  # today's: letterbox
    assert card["intended_use"].startswith("RESEARCH USE ONLY")


def test_letterbox_keeps_the_aspect_and_the_mask_comes_back_from_the_same_box() -> None:
    box = recipes.content_box(300, 512, 192, letterbox=True)
    assert (box.rows, box.columns) == (112, 192) and (box.top, box.left) == (40, 0)
    assert recipes.content_box(300, 512, 192, letterbox=False) == recipes.Box(0, 0, 192, 192)
    assert recipes.content_box(64, 64, 192, letterbox=True) == recipes.Box(0, 0, 192, 192)
    # a disc on a wide slice stays a disc in the square, with black bands above and below
    yy, xx = np.mgrid[:300, :512]
    disc = ((yy - 150) ** 2 + (xx - 256) ** 2 < 80**2).astype(np.float32)
    square = recipes.resize_unit(disc, 192, letterbox=True)
    assert square[: box.top].max() == 0 and square[box.top + box.rows :].max() == 0
    ys, xs = np.nonzero(square >= 0.5)
    assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 1  # round, not squashed
    stretched = recipes.resize_unit(disc, 192, letterbox=False)
    ys, xs = np.nonzero(stretched >= 0.5)
    assert (ys.max() - ys.min()) > 1.5 * (xs.max() - xs.min())  # what version 1 did to it
    # the network's square back on the slice's grid: the disc where it was
    for letterbox in (True, False):
        back = recipes.to_grid(recipes.resize_unit(disc, 192, letterbox), 300, 512, letterbox) >= 0.5
        assert back.shape == (300, 512)
        assert (back & (disc > 0)).sum() * 2 / (back.sum() + disc.sum()) > 0.98
    assert np.array_equal(recipes.resize_mask(disc, 192, True), (square >= 0.5).astype(np.uint8))


def test_letterbox_and_stretch_agree_on_a_square() -> None:
    unit = np.random.default_rng(0).random((256, 256, 3), np.float32)
    np.testing.assert_array_equal(recipes.resize_unit(unit, 192, True), recipes.resize_unit(unit, 192, False))


def test_the_content_gate_ignores_the_bands() -> None:
    from service.inputs import Volume
    from service.worker.preprocess import plan, prepared

    grey = np.full((1, 60, 200), 0.4, np.float32)  # one constant slice: nothing to segment, whatever the bands
    volume = Volume(pixels=grey, format="tensor", modality="MR")
    (image,) = prepared(volume, plan(volume, 64), CONFIG.mean, CONFIG.std)
    assert image is None
