"""Intensity mapping and resizing, checked by hand on tiny volumes."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from models.recipe import Recipe
from service.inputs import Volume
from service.worker.preprocess import PICTURE_WINDOW, plan, slices, to_unit

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def grey(values: list[list[float]] | np.ndarray, **kwargs: object) -> Volume:
    pixels = np.asarray(values)
    return Volume(pixels=pixels if pixels.ndim == 3 else pixels[None], **kwargs)  # type: ignore[arg-type]


def test_ct_uses_the_recipes_window_not_the_headers() -> None:
    """The model saw one CT window in training; a header's window is a reader's preference and is ignored."""
    volume = grey(
        np.array([[-1000, -160, 0, 40, 240, 1000]], np.int16), format="dicom", modality="CT", window=(40, 400)
    )
    p = plan(volume, 8, Recipe(ct_window=(40.0, 400.0)))
    assert p.method == "ct-window" and p.window == (40, 400) and p.input_size == 8
    # low edge 40 - 200 = -160, width 400: -160 -> 0, 0 -> 0.4, 40 -> 0.5, 240 -> 1 (clipped), 1000 -> 1
    assert to_unit(volume.pixels[0], p) == pytest.approx(np.array([[0, 0, 0.4, 0.5, 1, 1]], np.float32))
    assert to_unit(volume.pixels[0], p).dtype == np.float32
    default = plan(volume, 8)
    assert default.window == Recipe().ct_window == (-600.0, 1500.0)


def test_ct_without_window_uses_the_recipe() -> None:
    volume = grey(np.array([[-1350, -600, 150]], np.int16), format="nifti", modality="CT")
    p = plan(volume, 4)
    assert p.method == "ct-window" and p.window == Recipe().ct_window
    assert to_unit(volume.pixels[0], p) == pytest.approx(np.array([[0.0, 0.5, 1.0]]))


def test_eight_bit_grey_of_a_display_modality_is_a_picture_whatever_the_format() -> None:
    """An 8-bit ultrasound DICOM holds the same display values as its PNG export: same plan, same tensor."""
    values = np.array([[[0, 51, 255]]], np.uint8)
    as_dicom = plan(grey(values, format="dicom", modality="US"), 4)
    as_png = plan(grey(values, format="png", modality="US"), 4)
    assert as_dicom == as_png and as_dicom.window == PICTURE_WINDOW
    assert plan(grey(values, format="dicom", modality="MR"), 4).method == "percentile"


def test_mr_uses_volume_percentiles_even_with_a_header_window() -> None:
    values = np.arange(2 * 10 * 10, dtype=np.int16).reshape(2, 10, 10)
    volume = grey(values, format="dicom", modality="MR", window=(600, 1600))
    p = plan(volume, 4)
    lo, hi = np.percentile(values, [0.5, 99.5])
    assert p.method == "percentile" and p.percentiles == pytest.approx((lo, hi)) and p.window is None
    unit = to_unit(values[1], p)
    assert unit.min() >= 0 and unit.max() == 1.0
    assert unit[0, 0] == pytest.approx((100 - lo) / (hi - lo))


def test_percentiles_of_a_large_volume_come_from_a_sample() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(300, 100, (64, 256, 256)).astype(np.int16)
    p = plan(grey(values, format="nifti"), 32)
    exact = np.percentile(values, [0.5, 99.5])
    assert p.method == "percentile" and np.allclose(p.percentiles, exact, atol=10)


def test_radiograph_follows_its_header_window_and_pictures_are_taken_as_they_are() -> None:
    xr = grey(np.array([[0, 1000, 2000]], np.uint16), format="dicom", modality="DX", window=(1000, 2000))
    p = plan(xr, 4)
    assert p.method == "window" and to_unit(xr.pixels[0], p) == pytest.approx(np.array([[0, 0.5, 1.0]]))
    photo = grey(np.array([[0, 51, 255]], np.uint8), format="png")
    p = plan(photo, 4)
    assert p.method == "window" and p.window == PICTURE_WINDOW
    assert to_unit(photo.pixels[0], p) == pytest.approx(np.array([[0, 0.2, 1.0]]))


def test_rgb_is_divided_by_255() -> None:
    pixels = np.zeros((1, 2, 2, 3), np.uint8)
    pixels[0, 0, 0] = (255, 51, 0)
    volume = Volume(pixels=pixels, format="jpeg")
    p = plan(volume, 2)
    assert p.method == "rgb" and p.window is None and p.percentiles is None
    assert to_unit(pixels[0], p)[0, 0] == pytest.approx([1.0, 0.2, 0.0])


def test_network_input_is_normalised_with_the_given_mean_and_std() -> None:
    volume = grey(np.full((1, 20, 30), 51, np.uint8), format="png")  # 51 / 255 = 0.2 everywhere
    (tensor,) = slices(volume, plan(volume, 16), MEAN, STD)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == np.float32
    for channel in range(3):
        assert tensor[channel, 5, 7] == pytest.approx((0.2 - MEAN[channel]) / STD[channel], abs=1e-5)
    rgb = Volume(pixels=np.full((1, 40, 40, 3), (255, 0, 51), np.uint8), format="jpeg")
    (tensor,) = slices(rgb, plan(rgb, 8), MEAN, STD)
    expected = [(v - m) / s for v, m, s in zip((1.0, 0.0, 0.2), MEAN, STD, strict=True)]
    assert tensor[:, 3, 3] == pytest.approx(expected, abs=1e-5)


def test_constant_and_nearly_constant_images() -> None:
    flat = grey(np.full((2, 8, 8), 7, np.int16), format="nifti")
    p = plan(flat, 4)
    assert p.method == "minmax" and p.window is None
    tensors = list(slices(flat, p, MEAN, STD))
    assert all(np.isfinite(t).all() for t in tensors)
    assert tensors[0][0, 0, 0] == pytest.approx(-MEAN[0] / STD[0])
    sparse = np.zeros((1, 100, 100), np.uint16)
    sparse[0, 0, :5] = 1000  # 0.05 % bright: both percentiles are 0
    p = plan(grey(sparse, format="nifti"), 4)
    assert p.method == "minmax" and p.window == (500.0, 1000.0)
    assert to_unit(sparse[0], p)[0, 0] == 1.0


def test_generator_matches_slice_by_slice_calls() -> None:
    values = np.random.default_rng(2).integers(-1000, 2000, (2, 50, 70)).astype(np.int16)
    volume = grey(values, format="dicom", modality="MR")
    p = plan(volume, 24)
    together = list(slices(volume, p, MEAN, STD))
    assert len(together) == 2
    for k in range(2):
        (alone,) = slices(grey(values[k : k + 1], format="dicom", modality="MR"), p, MEAN, STD)
        assert np.array_equal(together[k], alone)
    assert together[0] is not together[1] and not np.shares_memory(together[0], together[1])


def test_downscale_is_antialiased_and_fast() -> None:
    stripes = np.zeros((1, 512, 512), np.uint8)
    stripes[0, :, ::2] = 255  # one-pixel stripes: point sampling would give 0 or 1, a proper filter about 0.5
    volume = grey(stripes, format="png")
    p = plan(volume, 192)
    (tensor,) = slices(volume, p, (0, 0, 0), (1, 1, 1))
    assert abs(float(tensor.mean()) - 0.5) < 0.02 and float(tensor[:, 8:-8, 8:-8].std()) < 0.1
    ct = grey(np.random.default_rng(3).integers(-1024, 3000, (20, 512, 512)).astype(np.int16), format="dicom")
    ct.modality = "CT"
    p = plan(ct, 192)
    start = time.perf_counter()
    produced = sum(1 for _ in slices(ct, p, MEAN, STD))
    per_slice = (time.perf_counter() - start) / produced
    assert per_slice < 0.005, f"{per_slice * 1000:.1f} ms per 512 x 512 slice"


def test_memory_stays_at_one_slice() -> None:
    ct = grey(np.zeros((40, 512, 512), np.int16), format="dicom", modality="CT")  # 20 MiB; float copy: 40 MiB
    p = plan(ct, 192)
    tracemalloc.start()
    try:
        for _ in slices(ct, p, MEAN, STD):
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 512 * 512 * 4  # a few float slices at most


def test_a_picture_named_ct_is_not_read_in_hounsfield_units() -> None:
    screenshot = grey(np.array([[0, 255]], np.uint8), format="jpeg", modality="CT")
    p = plan(screenshot, 4)
    assert p.method == "window" and p.window == PICTURE_WINDOW
    deep = grey(np.array([[0, 100, 60000]], np.uint16), format="png", modality="CT")
    assert plan(deep, 4).method == "percentile"
