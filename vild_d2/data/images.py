"""Reading a dataset dict's original image (what the precompute jobs and the online targets
crop: proposals are given in its coordinates)."""

import numpy as np
import torch
from detectron2.data.detection_utils import read_image

__all__ = ["SAMPLE_PHOTOS", "read_rgb", "sample_photo"]

# Real photographs that scikit-image ships (no download): the server's samples, the export
# tool's default tracing image and the benchmarks' inputs.
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def read_rgb(dataset_dict: dict) -> torch.Tensor:
    """The original image of a dataset dict: (3, H, W) uint8 RGB, checked against its
    "height"/"width" (the coordinates proposals are given in)."""
    file_name = dataset_dict["file_name"]
    try:
        image = read_image(file_name, format="RGB")
    except (OSError, ValueError) as e:  # missing, corrupt or truncated (PIL's message may omit it)
        raise OSError(f"{file_name}: cannot read image ({e})") from e
    h, w = image.shape[:2]
    expected = (dataset_dict.get("height", h), dataset_dict.get("width", w))
    if (h, w) != tuple(expected):
        raise ValueError(
            f"{file_name}: image is {h}x{w} (HxW) but the dataset says {expected[0]}x{expected[1]}"
        )
    # read_image can return a read-only view; torch needs a writable array.
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)


def sample_photo(name: str) -> np.ndarray:
    """One of :data:`SAMPLE_PHOTOS` as RGB uint8 (H, W, 3)."""
    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"no sample photo {name!r}: one of {', '.join(SAMPLE_PHOTOS)}")
    from skimage import data as skdata

    return np.ascontiguousarray(getattr(skdata, name)())
