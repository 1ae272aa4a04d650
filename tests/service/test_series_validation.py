"""A DICOM series is segmented only when its slices make one regular volume (issue 20, item 2): a 4D series, a
missing slice, irregular steps and mixed orientations are each refused with a 422 naming what was found, at the
gateway's probe already, and a regular series still goes through."""

from __future__ import annotations

import copy
import re

import pytest
from pydicom.uid import generate_uid

from service.config import LimitSettings
from service.errors import InvalidImage
from service.inputs import decode, probe
from service.inputs.dicom.spacing import check_positions
from tests.service.test_inputs import dataset, to_bytes

LIMITS = LimitSettings()


def series(positions: list[float], orientations: dict[int, list[float]] | None = None) -> list[tuple[str, bytes]]:
    """CT_small at each z position (mm), in upload order; ``orientations`` replaces some slices' IOP."""
    base = dataset("CT_small.dcm")
    files = []
    for index, z in enumerate(positions):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        position = [float(v) for v in base.ImagePositionPatient]
        position[2] = z
        ds.ImagePositionPatient = position
        ds.InstanceNumber = index + 1
        if orientations and index in orientations:
            ds.ImageOrientationPatient = orientations[index]
        files.append((f"IM{index:04d}.dcm", to_bytes(ds)))
    return files


def refused(files: list[tuple[str, bytes]], pattern: str) -> str:
    with pytest.raises(InvalidImage, match=pattern) as probed:
        probe(files, LIMITS, None)  # the gateway refuses it before queueing
    with pytest.raises(InvalidImage, match=pattern):
        decode(files, LIMITS, None)
    assert probed.value.http_status == 422
    return probed.value.message


def test_a_regular_series_in_any_upload_order_passes() -> None:
    files = series([7.5, 0.0, 5.0, 2.5])
    assert probe(files, LIMITS, None).shape == (4, 128, 128)
    assert decode(files, LIMITS, None).spacing[0] == pytest.approx(2.5)


def test_a_4d_series_is_refused() -> None:
    message = refused(series([0.0, 2.5, 5.0, 0.0, 2.5, 5.0]), "4D")
    assert "6 slices at 3 positions (2 per position)" in message


def test_a_duplicate_position_is_refused() -> None:
    message = refused(series([0.0, 2.5, 2.5, 5.0]), "4 slices at 3 positions")
    assert "some positions repeated" in message


def test_a_missing_slice_is_refused_with_where_it_is() -> None:
    message = refused(series([0.0, 2.5, 5.0, 10.0, 12.5]), "missing 1 slice:")
    assert "a 5.00 mm gap between slices 3 and 4 of 5" in message and "steps 2.50 mm" in message
    assert re.search("missing 2 slices", refused(series([0.0, 2.5, 5.0, 12.5, 15.0, 17.5]), "missing"))


def test_irregular_spacing_is_refused() -> None:
    refused(series([0.0, 2.5, 5.0, 8.3, 10.8]), "irregularly spaced: a 3.30 mm step")


def test_mixed_orientations_are_refused() -> None:
    tilted = {2: [1.0, 0.0, 0.0, 0.0, 0.8, 0.6]}
    refused(series([0.0, 2.5, 5.0], tilted), "mixed orientations: file 3's slices are not parallel")


def test_the_tolerance_is_a_setting() -> None:
    files = series([0.0, 2.5, 5.0, 8.0])
    with pytest.raises(InvalidImage):
        probe(files, LIMITS, None)
    assert probe(files, LimitSettings(slice_spacing_tolerance=0.25), None).shape[0] == 4


@pytest.mark.parametrize(
    ("along", "step"), [([0.0], None), ([3.0, 1.0], 2.0), ([0.0, 1.01, 1.99, 3.0], pytest.approx(1.01))]
)
def test_check_positions(along: list[float], step: object) -> None:
    assert check_positions(along, 0.1) == step


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_photographs_are_read_as_displayed_exif_orientation_applied(orientation: int) -> None:
    """(issue 20, item 3) A photo stored sideways with an EXIF orientation is segmented the way a viewer shows it."""
    import io

    import numpy as np
    from PIL import Image, ImageOps

    stored = np.zeros((40, 60, 3), np.uint8)
    stored[5:15, 10:20] = 255  # a bright corner patch tells the turns apart
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", exif=exif, quality=95)
    files = [("photo.jpg", buffer.getvalue())]
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))
    header, volume = probe(files, LIMITS, None), decode(files, LIMITS, None)
    assert header.shape == volume.shape == (1, *expected.shape[:2])
    assert np.array_equal(volume.pixels[0], expected)
    assert (volume.shape[1:] == (60, 40)) == (orientation in (6, 8))
