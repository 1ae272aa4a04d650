"""The domain-randomised training tasks: a random target (models/data/synth/randomised.py) on real or rendered
anatomy of one modality family, or nothing at all (about one case in five).

Each task is one concept a user would name: a lesion in the brain on MR, a lesion on CT, a lesion on ultrasound,
a lesion in a colour image. The backgrounds are real where a package ships them (backgrounds.py) and otherwise the
healthy output of the modality's own renderer, so the target, not the scene, is what the tasks share.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import backgrounds, ct, dermoscopy, endoscopy, histology, ultrasound
from .common import Case, CaseContext
from .randomised import acquisition, negative, paint, target_core


def _healthy(render: Callable[[CaseContext], Case], ctx: CaseContext) -> Case:
    return render(CaseContext(rng=ctx.rng, size=ctx.size, has_target=False, split=ctx.split, index=ctx.index))


def _finish(ctx: CaseContext, image: np.ndarray, tissue: np.ndarray, units: str, meta: dict, low: float, high: float):
    rng = ctx.rng
    if ctx.has_target:
        core, necrotic, drawn = target_core(rng, tissue)
        image, mask, painted = paint(rng, image, tissue, core, necrotic)
        meta.update(drawn, **painted, negative=None)
    else:
        image, kind = negative(rng, image, low, high)
        mask = np.zeros(image.shape[:2], bool)
        meta["negative"] = kind
    image = acquisition(rng, image, units)
    return image, mask, meta


def render_mr(ctx: CaseContext) -> Case:
    """A lesion in the brain on the MNI152 T1, any plane; negatives are healthy slices, blanks or noise."""
    raw, brain, meta = backgrounds.mni_slice(ctx.rng, ctx.split, ctx.size)
    raw, mask, meta = _finish(ctx, raw, brain, "mri", meta, 0.0, float(raw.max()))
    return Case(np.zeros(mask.shape, np.float32), mask, meta, raw=np.clip(raw, 0, None), units="MR")


def render_ct(ctx: CaseContext) -> Case:
    """A lesion in soft tissue on pydicom's CTs, or in the lungs or mediastinum of a rendered chest CT."""
    rng = ctx.rng
    if rng.random() < 0.6:
        hu, tissue, meta = backgrounds.ct_slice(rng, ctx.size)
    else:
        chest = _healthy(ct.render, ctx)
        hu = chest.raw
        tissue = (hu > -950) & (hu < 150)
        meta = {"background": "rendered chest"}
    hu, mask, meta = _finish(ctx, hu, tissue, "ct", meta, -1024.0, 100.0)
    return Case(np.zeros(mask.shape, np.float32), mask, meta, raw=hu, units="CT")


def render_us(ctx: CaseContext) -> Case:
    """A lesion in the tissue of a rendered thyroid or breast scan (display values)."""
    render = ultrasound.render_thyroid if ctx.rng.random() < 0.5 else ultrasound.render_breast
    image = _healthy(render, ctx).image
    tissue = image > 0.04
    image, mask, meta = _finish(ctx, image, tissue, "ultrasound", {"background": render.__name__}, 0.0, 1.0)
    return Case(np.clip(image, 0, 1).astype(np.float32), mask, meta)


def render_colour(ctx: CaseContext) -> Case:
    """A lesion in a colour image: packaged stained sections and retina photographs, or a rendered skin, colon or
    gland scene with its own target left out."""
    rng = ctx.rng
    if rng.random() < 0.5:
        image, tissue, meta = backgrounds.colour_photo(rng, ctx.size)
    else:
        render = (dermoscopy.render, endoscopy.render, histology.render)[int(rng.integers(3))]
        image = _healthy(render, ctx).image
        tissue = image.mean(axis=2) > 0.06
        meta = {"background": render.__module__.rsplit(".", 1)[-1]}
    image, mask, meta = _finish(ctx, image, tissue, "rgb", meta, 0.0, 1.0)
    return Case(np.clip(image, 0, 1).astype(np.float32), mask, meta)
