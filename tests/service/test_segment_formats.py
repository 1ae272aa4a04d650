"""``c2p segment --format json,dicom-seg,nifti,png``: every format the input supports is written, each on its own.

The real pipeline (the tiny test model's export, the service's decoders and writers) through ``service.cli.main``,
as tests/test_cli.py runs it: a format this input cannot have (a DICOM SEG of a NIfTI) is skipped with one warning
and named in the summary, and is no failure; an input that cannot be decoded is.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from service.cli import main

ALL = "json,dicom-seg,nifti,png"


def _segment(
    exported: Path, inputs: list[Path], out: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[dict[str, object]]]:
    capsys.readouterr()  # what the export fixture printed
    code = main(["segment", *map(str, inputs), "--out", str(out), "--format", ALL, "--model", str(exported), "--quiet"])
    return code, json.loads(capsys.readouterr().out)


def _nifti(path: Path) -> Path:
    import nibabel as nib
    import numpy as np

    data = np.zeros((48, 40, 4), dtype=np.int16)
    data[12:36, 10:30, 1:3] = 500
    nib.save(nib.Nifti1Image(data, np.diag([0.9, 0.8, 3.0, 1.0])), path)
    return path


def test_a_nifti_gets_every_format_but_dicom_seg_and_exits_0(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import nibabel as nib
    from PIL import Image

    scan = _nifti(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="service.segment"):
        code, summary = _segment(exported, [scan], out, capsys)

    assert code == 0
    [entry] = summary
    assert "error" not in entry
    assert sorted(Path(p).name for p in entry["outputs"]) == ["scan.json", "scan.nii.gz", "scan.png"]  # type: ignore[union-attr]
    assert sorted(p.name for p in out.iterdir()) == ["scan.json", "scan.nii.gz", "scan.png"]
    skipped = entry["skipped"]
    assert isinstance(skipped, dict) and list(skipped) == ["dicom-seg"]
    assert "needs a DICOM input" in skipped["dicom-seg"]
    lines = [r for r in caplog.records if r.name == "service.segment"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert lines[0].getMessage() == f"scan: dicom-seg skipped: {skipped['dicom-seg']}"
    assert nib.load(out / "scan.nii.gz").shape == (48, 40, 4)
    with Image.open(out / "scan.png") as overlay:
        assert overlay.size == (48, 40)


def test_a_dicom_gets_all_four_formats_and_exits_0(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    ct = tmp_path / "ct.dcm"
    shutil.copyfile(get_testdata_file("CT_small.dcm"), ct)  # type: ignore[arg-type]
    out = tmp_path / "out"
    code, summary = _segment(exported, [ct], out, capsys)

    assert code == 0
    [entry] = summary
    assert "error" not in entry and "skipped" not in entry
    names = ["ct.json", "ct.nii.gz", "ct.png", "ct.seg.dcm"]
    assert sorted(Path(p).name for p in entry["outputs"]) == names  # type: ignore[union-attr]
    assert sorted(p.name for p in out.iterdir()) == names
    seg = pydicom.dcmread(out / "ct.seg.dcm")
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == pydicom.dcmread(ct).StudyInstanceUID


def test_a_corrupt_input_fails_and_the_others_are_still_written(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    scan = _nifti(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    code, summary = _segment(exported, [broken, scan], out, capsys)

    assert code == 1  # the corrupt input is a failure; the NIfTI's skipped dicom-seg is not a second one
    assert summary[0]["error"]["code"] in ("invalid_image", "unsupported_format")  # type: ignore[index]
    assert "outputs" not in summary[0] and not (out / "broken.json").exists()
    assert "error" not in summary[1] and list(summary[1]["skipped"]) == ["dicom-seg"]  # type: ignore[arg-type]
    assert sorted(p.name for p in out.iterdir()) == ["scan.json", "scan.nii.gz", "scan.png"]
