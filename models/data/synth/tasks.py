"""The benchmark's task table: one ``TaskSpec`` per synthetic dataset (what it stands in for, how it is labelled,
which renderer draws it), and ``TASKS`` by name.

The table is data the generator, the writer and the tests all read; it lives apart from the rendering and writing
code so that adding or describing a task touches this file only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import ct, dermoscopy, endoscopy, histology, lesions, mri, oct, ultrasound, xray
from .common import Case, CaseContext


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: what it stands in for, how it is labelled and how it is rendered."""

    name: str
    dataset_id: int  # 101.. training tasks, 201.. zero-shot
    dataset_name: str  # CamelCase part of the folder name
    modality: str  # ultrasound | ct | mri | oct | histology | endoscopy | dermoscopy | xray
    target: str
    organ: str
    rgb: bool
    split: str  # "train" | "zero-shot"
    description: str
    stands_in_for: str
    channel: str  # nnU-Net channel name of grey tasks (US, CT, MRI, OCT, XRAY)
    render: Callable[[CaseContext], Case] = field(repr=False, compare=False)
    empty_fraction: float = 0.2
    concept: str = ""  # what the model says it segmented (the semantic targets name it, serving reads it out)

    @property
    def folder(self) -> str:
        return dataset_folder_name(self)

    @property
    def channel_names(self) -> dict[str, str]:
        return {"0": "R", "1": "G", "2": "B"} if self.rgb else {"0": self.channel}


def dataset_folder_name(spec: TaskSpec) -> str:
    return f"Dataset{spec.dataset_id:03d}_{spec.dataset_name}"


_SPECS = [
    TaskSpec(
        "oct_lesion",
        101,
        "OCTLesion",
        "oct",
        "retinal lesion",
        "retina",
        False,
        "train",
        "Retinal OCT B-scan with layered retina and speckle; target: fluid or lesion pockets "
        "(subretinal fluid, pigment-epithelial detachment, intraretinal cysts, hyper-reflective material).",
        "AMD-SD",
        "OCT",
        oct.render,
        concept="retinal lesion on OCT",
    ),
    TaskSpec(
        "brain_mri_tumour",
        102,
        "BrainMRITumour",
        "mri",
        "brain tumour",
        "brain",
        False,
        "train",
        "T1 brain MRI slice of the MNI152 template with scalp and skull; target: a synthetic tumour "
        "(necrotic core with enhancing rim, enhancing extra-axial mass or non-enhancing mass). Training: "
        "axial slices of a central slab; test: held-out axial, coronal and sagittal slices.",
        "BTD",
        "MRI",
        mri.render,
        concept="brain lesion on MR",
    ),
    TaskSpec(
        "histology_glands",
        103,
        "HistologyGlands",
        "histology",
        "gland",
        "colon",
        True,
        "train",
        "H&E colorectal histology; target: glands (lumen with epithelium and basal nuclei), several "
        "per image; distractors: stroma, lymphoid aggregates, vessels, vacuoles, tears.",
        "EBHI",
        "RGB",
        histology.render,
        concept="glands in histology",
    ),
    TaskSpec(
        "thyroid_us_nodule",
        104,
        "ThyroidUSNodule",
        "ultrasound",
        "thyroid nodule",
        "thyroid",
        False,
        "train",
        "Transverse thyroid ultrasound (speckle, attenuation, shadowing); target: the nodule "
        "(hypo/iso/hyperechoic, halo, cystic parts, calcifications); distractors: carotid, jugular, "
        "trachea, oesophagus, muscles.",
        "TNUI",
        "US",
        ultrasound.render_thyroid,
        concept="thyroid nodule on ultrasound",
    ),
    TaskSpec(
        "colonoscopy_polyp",
        105,
        "ColonoscopyPolyp",
        "endoscopy",
        "polyp",
        "colon",
        True,
        "train",
        "Colonoscopy frame lit from the scope (folds, vessels, highlights, vignette); target: the polyp "
        "(sessile, pedunculated or flat); distractors: folds, lumen, debris, bubbles.",
        "Kvasir-SEG/CVC polyp sets",
        "RGB",
        endoscopy.render,
        concept="polyp in colonoscopy",
    ),
    TaskSpec(
        "ct_lung_infection",
        106,
        "CTLungInfection",
        "ct",
        "lung infection",
        "lung",
        False,
        "train",
        "Axial chest CT in a lung window; target: ground-glass, crazy-paving and consolidation patches "
        "inside the lungs; distractors: vessels, heart, bones, dependent density.",
        "COVID-19 CT lung infection",
        "CT",
        ct.render,
        concept="lung infection on CT",
    ),
    TaskSpec(
        "breast_us_lesion",
        107,
        "BreastUSLesion",
        "ultrasound",
        "breast lesion",
        "breast",
        False,
        "train",
        "Breast ultrasound with skin, fat lobules, fibroglandular layer, pectoralis and ribs; target: the "
        "lesion (spiculated hypoechoic mass with shadowing, oval circumscribed mass or cyst with enhancement).",
        "BUSI",
        "US",
        ultrasound.render_breast,
        concept="breast lesion on ultrasound",
    ),
    TaskSpec(
        "dermoscopy_lesion",
        108,
        "DermoscopyLesion",
        "dermoscopy",
        "skin lesion",
        "skin",
        True,
        "train",
        "Dermoscopy of skin; target: the pigmented lesion (irregular border, colour variegation, pigment "
        "network, globules); distractors: hairs, freckles, bubbles, ink, vignetting.",
        "ISIC 2018",
        "RGB",
        dermoscopy.render,
        concept="skin lesion in dermoscopy",
    ),
    TaskSpec(
        "mr_brain_lesion",
        109,
        "MRBrainLesion",
        "mri",
        "brain lesion",
        "brain",
        False,
        "train",
        "Domain-randomised: a random target (any size from 0.05 % to 40 %, eight shape families, bright, dark or "
        "iso-intense with a rim, random edge and texture) in the brain of the MNI152 T1, all three planes; MR "
        "acquisition (bias field, gamma, ghosting, Rician noise). One case in five has no target.",
        "brain lesions of any kind",
        "MRI",
        lesions.render_mr,
        concept="brain lesion on MR",
    ),
    TaskSpec(
        "ct_lesion",
        110,
        "CTLesion",
        "ct",
        "lesion",
        "body",
        False,
        "train",
        "Domain-randomised: a random target in soft tissue of pydicom's head and body CTs (random crops) or in a "
        "rendered chest CT, painted in HU; CT noise and blur. One case in five has no target.",
        "focal lesions on CT",
        "CT",
        lesions.render_ct,
        concept="lesion on CT",
    ),
    TaskSpec(
        "us_lesion",
        111,
        "USLesion",
        "ultrasound",
        "lesion",
        "soft tissue",
        False,
        "train",
        "Domain-randomised: a random target in the tissue of a rendered thyroid or breast scan, with speckle. One "
        "case in five has no target.",
        "focal lesions on ultrasound",
        "US",
        lesions.render_us,
        concept="lesion on ultrasound",
    ),
    TaskSpec(
        "colour_lesion",
        112,
        "ColourLesion",
        "histology",
        "lesion",
        "tissue",
        True,
        "train",
        "Domain-randomised: a random coloured target on scikit-image's stained section and retina photograph, or a "
        "rendered skin, colon or gland scene without its own target. One case in five has no target.",
        "focal findings in colour images",
        "RGB",
        lesions.render_colour,
        concept="lesion in a colour image",
    ),
    TaskSpec(
        "thyroid_us_tn3k",
        201,
        "ThyroidUSTN3K",
        "ultrasound",
        "thyroid nodule",
        "thyroid",
        False,
        "zero-shot",
        "Thyroid nodule ultrasound from another scanner: higher gain, coarser speckle, deeper field of view, "
        "lower dynamic range, heavier smoothing.",
        "TN3K",
        "US",
        ultrasound.render_thyroid_tn3k,
        concept="thyroid nodule on ultrasound",
    ),
    TaskSpec(
        "dermoscopy_ph2",
        202,
        "DermoscopyPH2",
        "dermoscopy",
        "skin lesion",
        "skin",
        True,
        "zero-shot",
        "Dermoscopy from another dermatoscope: round field of view, warm colour calibration, even lighting, "
        "centred lesions.",
        "PH2",
        "RGB",
        dermoscopy.render_ph2,
        concept="skin lesion in dermoscopy",
    ),
    TaskSpec(
        "xray_lungs",
        203,
        "XRayLungs",
        "xray",
        "lung field",
        "lung",
        False,
        "zero-shot",
        "PA chest radiograph (unseen modality); target: both lung fields; distractors: ribs, clavicles, "
        "heart, spine, diaphragm, gastric bubble. Every case has lungs (no empty masks).",
        "Montgomery X-ray",
        "XRAY",
        xray.render,
        0.0,
        concept="lung fields on chest X-ray",
    ),
]
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
