"""Reading the datasets users bring: nnU-Net v2 raw folders and plain folders of image/mask pairs.

Users' folders are where training breaks first, and a stack trace from deep inside a reader tells them
nothing. So ``open_dataset`` checks the whole structure up front (it lists files and reads only
``dataset.json`` and NIfTI headers), and every problem, then or while loading, is a ``DatasetError``
whose message starts with the path of the file or folder at fault.

Conventions the rest of the project relies on:

- A case is one 2D image. A 3D NIfTI volume becomes one case per slice along ``slice_axis`` (default:
  the last voxel axis, as nnU-Net's 2D configuration slices), with id ``<case>#z<index>``. Slices with
  an empty label are kept: whether to sample them is the trainer's decision.
- NIfTI planes are returned as SimpleITK (and so nnU-Net) index them: rows along the later voxel axis.
  Nothing is reoriented by the affine, so image and label always agree.
- Images come back float32 HxWx3 in [0, 1]; 8-bit pictures are kept as they are (their appearance is the
  signal), deeper ones (16-bit PNG, NIfTI) have no fixed display range and are scaled per plane by the
  0.5/99.5 percentiles, or by the dataset's window when it gives one, else the recipe's CT window for CT
  (models/recipe.py: the one recipe training, evaluation and the service share).
- Masks come back uint8 HxW in {0, 1}; files may hold {0, 1} or {0, 255}, anything else is refused
  rather than guessed.

One module per job: ``nnunet`` and ``pairs`` read the two layouts, ``metadata`` the ``c2p`` block both carry,
``images`` the image and mask files, ``common`` holds the records and the error all of them speak, and ``dataset``
the entry points. The package re-exports what the rest of the project imports from it.
"""

from __future__ import annotations

from models.data.layout.common import Case, DatasetError, DatasetInfo
from models.data.layout.dataset import find_datasets, open_dataset
from models.data.layout.images import load_case, load_image, scale_percentiles

__all__ = [
    "Case",
    "DatasetError",
    "DatasetInfo",
    "find_datasets",
    "load_case",
    "load_image",
    "open_dataset",
    "scale_percentiles",
]
