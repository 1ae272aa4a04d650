"""NIfTI volumes are sliced in one plane whatever their voxel order (issue 20, item 1): the same anatomy stored two
ways gives the same masks in world space, and every mask goes back on its file's own grid."""

from __future__ import annotations

import gzip
import itertools
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from service.config import Settings
from service.inputs import orientation
from service.outputs import formats
from service.worker.served import load_warm_engine
from tests.service.test_trust import run

ORDERS = [
    codes
    for axes in itertools.permutations(("LR", "PA", "IS"))
    for codes in itertools.product(*[(a[0], a[1]) for a in axes])
]


def stored_as(image: nib.Nifti1Image, codes: tuple[str, ...]) -> nib.Nifti1Image:
    """The same image (same world) with its voxels in another order."""
    return image.as_reoriented(ornt_transform(io_orientation(image.affine), axcodes2ornt(codes)))


def zyx(image: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(image.dataobj).transpose(2, 1, 0)


def test_all_48_voxel_orders_give_the_same_slices_and_world() -> None:
    rng = np.random.default_rng(0)
    affine = np.diag([0.9, 1.1, 2.5, 1.0])
    affine[:3, 3] = [-40, 12, 7]
    image = nib.Nifti1Image(rng.random((7, 5, 3), dtype=np.float32), affine)
    assert len(ORDERS) == 48
    for plane in orientation.PLANES:
        seen = []
        for codes in ORDERS:
            other = stored_as(image, codes)
            spacing = tuple(float(v) for v in other.header.get_zooms()[::-1])
            pixels, canonical, new_spacing = orientation.canonical(zyx(other), other.affine, spacing, plane)
            seen.append((pixels, canonical, new_spacing))
            back, back_affine = orientation.restore(pixels, canonical, orientation.axis_codes(other.affine))
            assert np.array_equal(back, zyx(other)) and np.allclose(back_affine, other.affine)
        pixels, canonical, new_spacing = seen[0]
        assert orientation.axis_codes(canonical) == orientation.PLANES[plane]
        for other_pixels, other_affine, other_spacing in seen[1:]:
            assert np.array_equal(other_pixels, pixels) and np.allclose(other_affine, canonical)
            assert other_spacing == pytest.approx(new_spacing)


def test_axial_slices_show_anterior_at_the_top_as_the_model_was_trained() -> None:
    """models/data/synth/mri.py draws MNI152 axial slices with anterior towards row 0."""
    volume = np.zeros((4, 6, 2), np.float32)  # (x, y, z), RAS: y grows towards anterior
    volume[:, 5, :] = 1  # the most anterior row of voxels
    pixels, _, _ = orientation.canonical(volume.transpose(2, 1, 0), np.eye(4), None, "axial")
    assert pixels.shape == (2, 6, 4) and pixels[:, 0, :].all() and not pixels[:, 1:, :].any()


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory):
    settings = Settings(cache_dir=tmp_path_factory.mktemp("cache"))
    return load_warm_engine(
        "c2p-femto-192",
        settings.model_copy(
            update={"engine": settings.engine.model_copy(update={"warmup": False, "intra_op_threads": 2})}
        ),
    )


def brain_slab() -> nib.Nifti1Image:
    """Eight axial slices of nilearn's packaged MNI152 T1 (2 mm) with a bright round 'lesion' in them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn.datasets import load_mni152_template

        template = load_mni152_template(resolution=2)
    data = np.asarray(template.get_fdata(), np.float32)[:, :, 40:48].copy()
    xx, yy = np.mgrid[: data.shape[0], : data.shape[1]]
    # 16 voxels (32 mm) across: big enough that the shipped model answers with a finding, not an abstention
    data[((xx - 40) ** 2 + (yy - 60) ** 2) < 256] = data.max() * 1.5
    affine = template.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 40], [0, 0, 0, 1]])
    return nib.Nifti1Image(data, affine)


def segmented(engine, image: nib.Nifti1Image) -> nib.Nifti1Image:
    segmentation = run(engine, [("brain.nii.gz", gzip.compress(image.to_bytes()))], "MR")
    labelmap = formats.render("nifti", segmentation.result, {})
    return nib.Nifti1Image.from_bytes(gzip.decompress(labelmap))


def test_the_same_anatomy_in_two_voxel_orders_gives_the_same_masks_in_world_space(shipped) -> None:
    ras = brain_slab()
    permuted = stored_as(ras, ("S", "L", "P"))  # axes permuted and flipped, the same world
    first, second = segmented(shipped, ras), segmented(shipped, permuted)
    assert first.shape == ras.shape and np.allclose(first.affine, ras.affine)  # back on each file's own grid
    assert second.shape == permuted.shape and np.allclose(second.affine, permuted.affine)
    a = np.asarray(first.dataobj) > 0
    b = np.asarray(stored_as(second, ("R", "A", "S")).dataobj) > 0  # the second mask on the first's grid
    assert a.sum() > 100, "the model found nothing: the comparison would prove nothing"
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice >= 0.99, dice


def test_the_slicing_plane_is_a_setting(shipped, tmp_path: Path) -> None:
    segmentation = run(shipped, [("brain.nii.gz", gzip.compress(brain_slab().to_bytes()))], "MR", slice_plane="coronal")
    result = segmentation.result
    assert result.input.orientation == "LIA" and result.input.stored_orientation == "RAS"
    assert result.input.shape[0] == brain_slab().shape[1]  # one slice per voxel along anterior-posterior
