from __future__ import annotations

import numpy as np
import pytest

from service.outputs.rle import _runs, area, decode, encode


def column_major_runs(mask: np.ndarray) -> list[int]:
    """Reference run lengths, the slow obvious way: column-major, starting with a run of zeros."""
    runs, current, length = [], 0, 0
    for value in mask.T.reshape(-1):
        if value != current:
            runs.append(length)
            current, length = value, 0
        length += 1
    return [*runs, length]


def test_known_vector() -> None:
    # Column-major: column 0 = [0, 1, 1], column 1 = [0, 0, 1] -> 1 zero, 2 ones, 2 zeros, 1 one.
    mask = np.array([[0, 0], [1, 0], [1, 1]], np.uint8)
    rle = encode(mask)
    assert rle == {"size": [3, 2], "counts": "122O"}
    assert _runs(rle["counts"]) == [1, 2, 2, 1]
    assert decode(rle).tolist() == mask.tolist()
    assert area(rle) == 3


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 64), (256, 200)])
def test_round_trip_and_pycocotools_agree(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = (rng.random(shape) < density).astype(np.uint8)
        rle = encode(mask)
        assert isinstance(rle["counts"], str)
        assert _runs(rle["counts"]) == column_major_runs(mask)
        assert np.array_equal(decode(rle), mask)
        assert area(rle) == int(mask.sum())


def test_bool_and_nonbinary_inputs_mean_nonzero() -> None:
    mask = np.array([[0, 3], [255, 0]], np.int32)
    assert decode(encode(mask)).tolist() == [[0, 1], [1, 0]]
    assert encode(mask.astype(bool)) == encode(mask)


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ({"size": [2, 2], "counts": "zz"}, "characters"),
        ({"size": [2], "counts": "04"}, "size"),
        ({"size": [2, 2], "counts": 4}, "counts"),
        ({"size": [2, 2], "counts": "1"}, "cover"),
        ({"size": [2, 2], "counts": "o"}, "ends inside"),
    ],
)
def test_malformed_rle_is_a_clear_error(rle: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode(rle)


def test_encode_refuses_non_2d() -> None:
    with pytest.raises(ValueError, match="2D"):
        encode(np.zeros((2, 2, 2)))
