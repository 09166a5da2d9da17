"""Data for training and evaluation: the embedded digits, image folders, preprocessing.

Importing this package needs neither kornia nor scikit-learn; they are imported when first used.
"""

from vig_pyg.data.digits import DIGITS_CLASSES, TensorImageDataset, load_digits_split
from vig_pyg.data.folder import (
    IMG_EXTENSIONS,
    FolderSplit,
    ImageFolderDataset,
    check_image,
    folder_fingerprint,
    open_image,
    scan_image_folder,
)
from vig_pyg.data.transforms import (
    EvalResize,
    Preprocessing,
    TrainCrop,
    batch_transform,
    pil_to_uint8,
    to_rgb,
    uint8_to_pil,
)

__all__ = [
    "DIGITS_CLASSES",
    "IMG_EXTENSIONS",
    "EvalResize",
    "FolderSplit",
    "ImageFolderDataset",
    "Preprocessing",
    "TensorImageDataset",
    "TrainCrop",
    "batch_transform",
    "check_image",
    "folder_fingerprint",
    "load_digits_split",
    "open_image",
    "pil_to_uint8",
    "scan_image_folder",
    "to_rgb",
    "uint8_to_pil",
]
