"""From a decoded Volume to the network's input, by the model's own recipe (models/recipe.py).

The service decides nothing about intensities itself: the recipe the model card carries is the one the training
data was made with, so the same image gives the same tensor here, in training and in ``c2p evaluate``. This
module only says what a Volume is in the recipe's terms (a picture file, RGB, its modality and header window),
records the plan in the result so a caller can tell how its input was read, and works one slice at a time, so a
512 x 512 x 300 CT is never copied to float whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from models import recipe as recipes
from models.recipe import PICTURE_WINDOW, Recipe
from service.inputs import Volume
from service.schema import Preprocessing

__all__ = ["PICTURE_WINDOW", "plan", "prepared", "slices", "to_unit"]


def plan(volume: Volume, input_size: int, recipe: Recipe | None = None) -> Preprocessing:
    """How this volume's intensities map to [0, 1], decided once for the whole volume so slices agree."""
    if input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    pixels = volume.pixels
    picture = volume.format in ("png", "jpeg") or (volume.format == "tensor" and pixels.dtype == np.uint8)
    decided = recipes.decide(
        pixels,
        recipe or Recipe(),
        modality=volume.modality,
        rgb=pixels.ndim == 4,
        picture=picture,
        header_window=volume.window,
    )
    recipe = recipe or Recipe()
    _, rows, columns = volume.shape
    box = recipes.content_box(rows, columns, input_size, recipe.letterbox)
    return Preprocessing(
        method=decided.method,
        window=decided.window,
        percentiles=decided.percentiles,
        input_size=input_size,
        resize="letterbox" if recipe.letterbox else "stretch",
        pixels_per_model_pixel=(round(rows / box.rows, 4), round(columns / box.columns, 4)),
    )


def _recipe_plan(plan: Preprocessing) -> recipes.Plan:
    return recipes.Plan(plan.method, plan.window, plan.percentiles)


def to_unit(slice_: np.ndarray, plan: Preprocessing) -> np.ndarray:
    """One slice as float32 in [0, 1]: [Y, X] for grey, [Y, X, 3] for RGB."""
    return recipes.to_unit(slice_, _recipe_plan(plan))


def _units(volume: Volume, plan: Preprocessing) -> Iterator[tuple[np.ndarray, recipes.Box]]:
    """Each slice mapped to [0, 1] and resized into the network's square, one at a time, with its content box."""
    decided = _recipe_plan(plan)
    letterbox = plan.resize == "letterbox"
    _, rows, columns = volume.shape
    box = recipes.content_box(rows, columns, plan.input_size, letterbox)
    for plane in volume.pixels:
        yield recipes.resize_unit(recipes.to_unit(plane, decided), plan.input_size, letterbox), box


def prepared(
    volume: Volume, plan: Preprocessing, mean: Sequence[float], std: Sequence[float]
) -> Iterator[np.ndarray | None]:
    """Each slice as the network's float32 [3, S, S] input, or None where the content gate finds it blank
    (models/recipe.py: ``is_blank``); every array yielded is new (a batcher may hold it)."""
    for unit, box in _units(volume, plan):
        yield None if recipes.is_blank(box.of(unit)) else recipes.network_input(unit, mean, std)


def slices(volume: Volume, plan: Preprocessing, mean: Sequence[float], std: Sequence[float]) -> Iterator[np.ndarray]:
    """Each slice as the network's float32 [3, S, S] input, blank or not (benchmarks, parity checks)."""
    for unit, _ in _units(volume, plan):
        yield recipes.network_input(unit, mean, std)
