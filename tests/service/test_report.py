from __future__ import annotations

import numpy as np
import pytest

from models.attributes import ATTRIBUTE_SLICES, NUM_GEOMETRY
from service.worker.report import SliceOutputs, build_reliability, mask_on_grid, volume_outliers


def slice_outputs(area: float, centroid: tuple[float, float] = (0.5, 0.5), agreement: float = 1.0) -> SliceOutputs:
    geometry = np.zeros(NUM_GEOMETRY, dtype=np.float32)
    geometry[ATTRIBUTE_SLICES["area"]] = area
    geometry[ATTRIBUTE_SLICES["centroid"]] = centroid
    valid = np.zeros(NUM_GEOMETRY, dtype=bool)
    if area > 0:
        valid[:] = True
    return SliceOutputs(
        prob=np.zeros((8, 8), dtype=np.float32),
        view_weights=np.ones(3, dtype=np.float32),
        view_inconsistency=np.zeros(3, dtype=np.float32),
        geometry_pred=geometry.copy(),
        geometry_mask=geometry,
        geometry_valid=valid,
        view_agreement=agreement,
        empty_gate=0.0,
    )


def test_mask_on_grid_resizes_the_probability_then_thresholds() -> None:
    prob = np.zeros((4, 4), dtype=np.float32)
    prob[1:3, 1:3] = 1.0
    mask = mask_on_grid(prob, 8, 12, 0.5, letterbox=False)
    assert mask.shape == (8, 12) and mask.dtype == np.uint8
    assert mask[4, 6] == 1 and mask[0, 0] == 0
    assert mask_on_grid(prob, 4, 4, 0.5, letterbox=True).sum() == 4


def test_a_spike_in_a_smooth_volume_is_an_outlier() -> None:
    areas = [0.10, 0.11, 0.12, 0.12, 0.45, 0.12, 0.11, 0.10, 0.09]
    flagged = volume_outliers([slice_outputs(a) for a in areas], mads=6.0)
    assert flagged.tolist() == [i == 4 for i in range(len(areas))]


def test_a_centroid_jump_is_an_outlier() -> None:
    centroids = [(0.5, 0.5)] * 3 + [(0.1, 0.9)] + [(0.5, 0.5)] * 3
    flagged = volume_outliers([slice_outputs(0.1, c) for c in centroids], mads=6.0)
    assert np.flatnonzero(flagged).tolist() == [3]


def test_steady_volumes_and_tiny_noise_have_no_outliers() -> None:
    steady = [slice_outputs(0.2 + 0.01 * np.sin(z)) for z in range(12)]
    assert not volume_outliers(steady, 6.0).any()
    noise = [slice_outputs(a) for a in (0.0, 0.001, 0.0, 0.003, 0.0, 0.0, 0.002)]
    assert not volume_outliers(noise, 6.0).any()
    assert volume_outliers([slice_outputs(0.1), slice_outputs(0.9)], 6.0).tolist() == [False, False]


def test_reliability_is_area_weighted_and_marks_suppressed_outliers() -> None:
    outputs = [slice_outputs(0.1, agreement=1.0), slice_outputs(0.1, agreement=0.0), slice_outputs(0.0)]
    report = build_reliability(outputs, [300, 100, 0], np.array([False, True, False]), suppress_outliers=True)
    scores = [s.score for s in report.slices]
    assert report.score == pytest.approx((300 * scores[0] + 100 * scores[1]) / 400, abs=1e-4)
    assert scores[0] - scores[1] == pytest.approx(0.5, abs=1e-4)  # agreement weighs 0.5
    assert report.outlier_slices == [1]
    assert [s.suppressed for s in report.slices] == [False, True, False]
    assert report.slices[2].geometry_measured["area"] is None
    assert not report.suppressed


def test_an_empty_result_scores_by_the_plain_mean() -> None:
    outputs = [slice_outputs(0.0), slice_outputs(0.0)]
    report = build_reliability(outputs, [0, 0], np.zeros(2, dtype=bool), suppress_outliers=True)
    assert report.score == pytest.approx(np.mean([s.score for s in report.slices]), abs=1e-5)
    assert report.level in ("high", "medium", "low")
