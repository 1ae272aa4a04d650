"""The README's panel: the shipped model, through the service's own pipeline, on real images packages ship.

    python scripts/overlay_panel.py --out docs/overlays.png [--json docs/overlays.json]

Each tile is what `c2p serve` answers for that file: the mask outline, the concept it read out, the calibrated
level, or "blank_input". Inputs: pydicom's CT_small and MR_small (DICOM), MNI152 T1 slices in three planes
(healthy: the right answer is empty), scikit-image's retina and stained section (colour), and an all-zero image.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def inputs() -> list[tuple[str, str, bytes, str | None]]:
    """(title, file name, bytes, modality hint)."""
    import nibabel as nib
    from pydicom.data import get_testdata_file

    out = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        out.append((f"pydicom {name}", name, Path(get_testdata_file(name)).read_bytes(), None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn.datasets import load_mni152_template

        t1 = np.asarray(load_mni152_template(resolution=1).get_fdata(), np.float32)
    for plane, cut in (("axial", t1[:, :, 80]), ("coronal", t1[:, 120, :]), ("sagittal", t1[60, :, :])):
        image = nib.Nifti1Image(np.ascontiguousarray(cut[..., None]), np.eye(4))
        out.append((f"MNI152 T1 {plane} (healthy)", f"mni-{plane}.nii", image.to_bytes(), "MR"))
    from skimage import data

    for name in ("retina", "immunohistochemistry"):
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).resize((512, 512)).save(buffer, format="PNG")
        out.append((f"scikit-image {name}", f"{name}.png", buffer.getvalue(), None))
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(buffer, format="PNG")
    out.append(("all-zero PNG", "zeros.png", buffer.getvalue(), None))
    return out


async def segment_all(model: str) -> list[tuple[str, np.ndarray, np.ndarray, dict]]:
    from service.config import EngineSettings, Settings
    from service.outputs import rle
    from service.worker.artifacts import ensure_artifact
    from service.worker.batcher import DynamicBatcher
    from service.worker.engine import load_engine
    from service.worker.pipeline import Pipeline
    from service.worker.preprocess import to_unit

    settings = Settings(model=model, engine=EngineSettings(warmup=False))
    engine = load_engine(ensure_artifact(model, settings.cache_dir), settings.engine)
    executor = ThreadPoolExecutor(2)
    batcher = DynamicBatcher(engine.run, settings.engine.max_batch_size, 1.0)
    pipeline = Pipeline(engine, settings, executor, batcher)
    tiles = []
    try:
        for title, name, data, modality in inputs():
            segmentation = await pipeline.run([(name, data)], modality)
            result = segmentation.result
            z = max(range(len(result.mask.slices)), key=lambda k: result.mask.slices[k].area)
            picture = to_unit(segmentation.volume.pixels[z], result.input.preprocessing)
            mask = rle.decode({"size": list(result.mask.size), "counts": result.mask.slices[z].counts})
            facts = {
                "input": title,
                "concept": result.concept.name,
                "code": f"{result.concept.code.scheme} {result.concept.code.value}",
                "level": result.reliability.level,
                "score": result.reliability.score,
                "reason": result.reliability.reason,
                "area": int(mask.sum()),
            }
            tiles.append((title, picture, mask.astype(bool), facts))
    finally:
        await batcher.close()
        executor.shutdown()
    return tiles


def draw(tiles: list[tuple[str, np.ndarray, np.ndarray, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.4 * rows))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, picture, mask, facts) in zip(axes.ravel(), tiles, strict=False):
        ax.imshow(picture, cmap=None if picture.ndim == 3 else "gray", vmin=0, vmax=1)
        if mask.any():
            ax.contour(mask, levels=[0.5], colors="red", linewidths=1.2)
        said = facts["reason"] or f"{facts['concept']} · {facts['level']} ({facts['score']:.2f})"
        ax.set_title(f"{title}\n{said}", fontsize=9)
    fig.suptitle("c2p-femto-192 through c2p serve's pipeline: RESEARCH USE ONLY", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="c2p-femto-192")
    parser.add_argument("--out", type=Path, default=Path("docs/overlays.png"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tiles = asyncio.run(segment_all(args.model))
    draw(tiles, args.out)
    facts = [t[3] for t in tiles]
    if args.json:
        args.json.write_text(json.dumps(facts, indent=1) + "\n")
    print(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
