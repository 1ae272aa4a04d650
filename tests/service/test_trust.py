"""What a result says beyond its mask, through the real pipeline: blank inputs come back empty without the model,
small findings survive the volume check, the concept is read out against the card, every result says its use."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from models.attributes import ATTRIBUTE_SLICES
from models.cards import INTENDED_USE
from models.concepts import NO_FINDING, UNKNOWN, vocabulary_card
from models.recipe import BLANK_STD
from service.config import EngineSettings, Settings
from service.worker.batcher import DynamicBatcher
from service.worker.interpret import CardReadout
from service.worker.pipeline import Pipeline
from tests.service.harness import engine_for

AREA, CENTROID = ATTRIBUTE_SLICES["area"].start, ATTRIBUTE_SLICES["centroid"]


class OracleEngine:
    """The export's artifact with a stand-in network that segments exactly what is bright: so a test can say what
    the right mask is, and count how often the engine is asked."""

    def __init__(self, engine: Any, embedding: np.ndarray | None = None) -> None:
        self.artifact = engine.artifact
        self.device = "cpu"
        self.calls = 0
        self.embedding = embedding

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        card = self.artifact.card["input"]
        unit = images[:, 0] * card["std"][0] + card["mean"][0]
        prob = (unit > 0.6).astype(np.float32)
        b, size = len(images), images.shape[-1]
        area = prob.reshape(b, -1).mean(-1)
        yy, xx = np.mgrid[:size, :size] / size
        geometry = np.zeros((b, 14), np.float32)
        valid = np.zeros((b, 14), bool)
        for i in range(b):
            if area[i] > 0:
                geometry[i, AREA] = area[i]
                geometry[i, CENTROID] = (prob[i] * xx).sum() / prob[i].sum(), (prob[i] * yy).sum() / prob[i].sum()
                valid[i, AREA] = valid[i, CENTROID] = True
        embedding = self.embedding if self.embedding is not None else np.eye(1, 384, 0, np.float32)[0]
        return {
            "prob": prob[:, None],
            "view_weights": np.ones((b, 3), np.float32),
            "view_inconsistency": np.zeros((b, 3), np.float32),
            "geometry_pred": geometry,
            "geometry_mask": geometry,
            "geometry_valid": valid,
            "view_agreement": np.ones(b, np.float32),
            "empty_gate": np.zeros(b, np.float32),
            "concept_embedding": np.repeat(embedding[None], b, axis=0),
        }


def run(engine: Any, files: list[tuple[str, bytes]], modality: str | None = None, **worker: Any):
    settings = Settings(model="unused", engine=EngineSettings(max_batch_size=4, warmup=False), worker=worker or {})

    async def go():
        executor = ThreadPoolExecutor(2)
        batcher = DynamicBatcher(engine.run, 4, 1.0)
        pipeline = Pipeline(engine, settings, executor, batcher)
        try:
            return await pipeline.run(files, modality)
        finally:
            await batcher.close()
            executor.shutdown()

    return asyncio.run(go())


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def nifti_gz(volume: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes())


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("zeros-512.png", lambda: png(np.zeros((512, 512), np.uint8))),
        ("constant-300x200.png", lambda: png(np.full((300, 200), 137, np.uint8))),
        ("near-constant.png", lambda: png((np.random.default_rng(0).random((256, 256)) < 0.001).astype(np.uint8))),
        ("zeros-197x233.nii.gz", lambda: nifti_gz(np.zeros((197, 233, 1), np.float32))),
        ("constant-volume.nii.gz", lambda: nifti_gz(np.full((40, 30, 5), 12.5, np.float32))),
    ],
)
def test_blank_input_is_an_empty_answer_without_the_model(exported: Path, name: str, make: Any) -> None:
    """A valid file with nothing in it is an answer, not an error: empty masks, reason blank_input, and the
    engine is never asked (so no model can hallucinate on it). The 197 x 233 zeros compress over 200:1."""
    engine = OracleEngine(engine_for(exported))
    result = run(engine, [(name, make())]).result
    assert engine.calls == 0
    assert all(s.area == 0 for s in result.mask.slices)
    assert result.reliability.reason == "blank_input" and result.reliability.suppressed
    assert all(s.blank and s.level == "high" for s in result.reliability.slices)
    assert result.concept.name == NO_FINDING and result.intended_use == INTENDED_USE


def test_a_blank_slice_inside_a_volume_is_gated_alone(exported: Path) -> None:
    volume = np.zeros((64, 64, 3), np.float32)
    volume[10:40, 10:40, 1] = 100.0  # only the middle slice has content
    volume[..., 2] = 5.0
    engine = OracleEngine(engine_for(exported))
    result = run(engine, [("v.nii.gz", nifti_gz(volume))]).result
    blank = [s.blank for s in sorted(result.reliability.slices, key=lambda s: s.index)]
    assert blank == [True, False, True] and result.reliability.reason is None
    assert engine.calls >= 1


def test_the_gate_threshold_is_one_grey_level() -> None:
    from models.recipe import is_blank

    rng = np.random.default_rng(1)
    assert is_blank(np.full((8, 8), 0.3, np.float32))
    assert is_blank(0.3 + rng.normal(0, BLANK_STD / 2, (64, 64)).astype(np.float32))
    assert not is_blank(0.3 + rng.normal(0, BLANK_STD * 3, (64, 64)).astype(np.float32))


def test_a_small_finding_on_two_of_twenty_slices_survives_the_default_volume_output(exported: Path) -> None:
    """About 1.2 % of the slice on slices 9 and 10 only: the volume check may flag it, it must not erase it."""
    rng = np.random.default_rng(0)
    volume = (rng.random((96, 96, 20)) * 100 - 800).astype(np.float32)  # lung parenchyma, in HU
    yy, xx = np.mgrid[:96, :96]
    disc = (yy - 40) ** 2 + (xx - 50) ** 2 <= 5.9**2  # 109 pixels = 1.2 % of 96 x 96
    for z in (9, 10):
        volume[..., z][disc.T] = 100.0  # a solid nodule: 0.97 in the recipe's CT window, the oracle segments it
    result = run(OracleEngine(engine_for(exported)), [("lesion.nii.gz", nifti_gz(volume))], "CT").result
    areas = {s.index: s.area for s in result.mask.slices}
    assert areas[9] > 0 and areas[10] > 0
    assert all(areas[z] == 0 for z in areas if z not in (9, 10))
    assert not any(s.suppressed for s in result.reliability.slices if s.index in (9, 10))
    assert {9, 10} <= set(result.reliability.outlier_slices)  # flagged for a reader to look at, not erased
    erased = run(OracleEngine(engine_for(exported)), [("l.nii.gz", nifti_gz(volume))], "CT", suppress_outliers=True)
    assert all(s.area == 0 for s in erased.result.mask.slices)  # the opt-in still erases what it flags


def test_a_finding_below_the_abstention_bound_is_not_returned(exported: Path) -> None:
    """The card's bound (fitted on calibration data) turns a finding the model cannot back into an empty answer
    that says why; without a bound, or above it, the same finding is returned."""
    picture = np.zeros((64, 64), np.uint8)
    picture[20:40, 20:40] = 250

    class Hesitant(OracleEngine):  # the views disagree: agreement 0.2, the score lands near 0.6
        def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
            out = super().run(images)
            out["view_agreement"] = np.full(len(images), 0.2, np.float32)
            return out

    base = engine_for(exported)
    returned = run(Hesitant(base), [("square.png", png(picture))]).result
    score = returned.reliability.slices[0].score
    assert returned.mask.slices[0].area > 0 and not returned.reliability.slices[0].abstained
    engine = Hesitant(base)
    bound = {"abstain_below": round(score + 0.01, 4)}
    engine.artifact = dataclasses.replace(base.artifact, card={**base.artifact.card, "reliability": bound})
    dropped = run(engine, [("square.png", png(picture))]).result
    assert dropped.mask.slices[0].area == 0
    assert dropped.reliability.reason == "low_confidence" and dropped.reliability.suppressed
    assert dropped.reliability.slices[0].abstained and dropped.reliability.slices[0].score == score
    assert dropped.reliability.slices[0].level == "low" and dropped.reliability.level == "low"  # whatever the score
    assert dropped.concept.name == NO_FINDING and dropped.intended_use == INTENDED_USE


def _vocabulary(names: list[str], threshold: float) -> dict[str, Any]:
    embeddings = np.eye(len(names), 384, dtype=np.float32)
    return vocabulary_card(names, embeddings, threshold, "test-encoder")


def test_the_concept_is_read_out_against_the_card(exported: Path) -> None:
    card = dict(engine_for(exported).artifact.card)
    card["concepts"] = _vocabulary(["lesion on CT", "brain lesion on MR", NO_FINDING], threshold=0.5)
    readout = CardReadout(card)
    embedding = np.zeros(384, np.float32)
    embedding[1] = 0.9
    embedding[0] = 0.3
    from service.worker.report import SliceOutputs

    blank = SliceOutputs.for_blank(8)
    found = SliceOutputs(**{**blank.__dict__, "blank": False, "concept_embedding": embedding})
    concept = readout.concept([found], [10])
    assert concept.name == "brain lesion on MR" and concept.code.scheme == "SCT"
    assert concept.code.value == "301766008" and concept.similarity == pytest.approx(0.9487, abs=1e-3)
    unsure = SliceOutputs(**{**found.__dict__, "concept_embedding": np.ones(384, np.float32)})
    assert readout.concept([unsure], [10]).name == UNKNOWN  # nearest cosine 1/sqrt(384) is below 0.5
    assert readout.concept([found], [0]).name == NO_FINDING  # an empty mask names nothing
    no_card = CardReadout({k: v for k, v in card.items() if k != "concepts"})
    assert no_card.concept([found], [10]).name == UNKNOWN  # a card without a vocabulary never guesses


def test_results_through_the_pipeline_carry_concept_and_intended_use(exported: Path) -> None:
    picture = np.zeros((64, 64), np.uint8)
    picture[20:40, 20:40] = 250
    result = run(OracleEngine(engine_for(exported)), [("square.png", png(picture))]).result
    assert result.mask.slices[0].area > 0
    assert result.concept.name == UNKNOWN  # the test export has no vocabulary
    assert result.concept.code.value == "85756007" and result.intended_use.startswith("RESEARCH USE ONLY")


def test_blank_inputs_through_c2p_segment_and_the_rest_api(
    exported: Path, tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The done-when of the trust issue, as a user meets it: c2p segment's summary and the REST JSON of blank and
    constant slices of any size say blank_input, name no concept, and carry the intended use."""
    import json

    from service.cli import main
    from service.config import QueueSettings
    from tests.service.harness import make_settings, running

    files = {
        "zeros-512.png": png(np.zeros((512, 512), np.uint8)),
        "constant-77x301.png": png(np.full((77, 301), 200, np.uint8)),
        "zeros.nii.gz": nifti_gz(np.zeros((197, 233, 3), np.float32)),
    }
    paths = []
    for name, data in files.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    capsys.readouterr()
    code = main(["segment", *map(str, paths), "--out", str(tmp_path / "out"), "--model", str(exported), "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and len(summary) == 3
    for entry in summary:
        assert entry["area"] == 0 and entry["reason"] == "blank_input" and entry["concept"] == NO_FINDING
        assert entry["intended_use"].startswith("RESEARCH USE ONLY")

    settings = make_settings(
        redis_url, QueueSettings(prefix=f"trust{np.random.default_rng().integers(1 << 30)}"), exported
    )

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            for name, data in files.items():
                response = await http.post("/v1/segmentations?wait=30", files={"file": (name, data)})
                assert response.status_code == 200, response.text
                result = response.json()["result"]
                assert result["reliability"]["reason"] == "blank_input", name
                assert all(s["area"] == 0 for s in result["mask"]["slices"])
                assert result["concept"]["name"] == NO_FINDING and result["intended_use"] == INTENDED_USE

    asyncio.run(scenario())
