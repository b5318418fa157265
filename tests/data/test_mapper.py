"""ViLDDatasetMapper: distillation boxes follow the image's geometric transforms exactly.

Expected boxes are worked out by hand; pixel checks tie every output box to the drawn square.
"""

import vild_d2  # noqa: F401  (compat bridges first)

import cv2
import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from vild_d2 import add_vild_config
from vild_d2.data import ViLDDatasetMapper

H, W = 64, 80
# BGR colours of the drawn squares; the noisy grey background stays in [90, 170].
RED = (0, 0, 255)
BLUE = (255, 0, 0)
GREEN = (0, 255, 0)
RED_BOX = [20.0, 10.0, 40.0, 30.0]  # XYXY_ABS, pixels x in [20, 40), y in [10, 30)
BLUE_BOX = [50.0, 36.0, 70.0, 56.0]
GREEN_BOX = [2.0, 2.0, 10.0, 10.0]  # small, in a corner: LSJ's crop often removes it


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.RandomState(0)
    img = rng.randint(90, 171, size=(H, W, 3)).astype(np.uint8)
    for (x0, y0, x1, y1), colour in ((RED_BOX, RED), (BLUE_BOX, BLUE), (GREEN_BOX, GREEN)):
        img[int(y0) : int(y1), int(x0) : int(x1)] = colour
    path = str(tmp_path / "img.png")
    assert cv2.imwrite(path, img)
    return path


def make_dict(file_name, distill_boxes=None, distill_embeddings=None, annotations=True):
    d = {"file_name": file_name, "height": H, "width": W, "image_id": 1}
    if annotations:
        x0, y0, x1, y1 = RED_BOX
        d["annotations"] = [
            {
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 0,
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            }
        ]
    if distill_boxes is not None:
        d["distill_boxes"] = distill_boxes
    if distill_embeddings is not None:
        d["distill_embeddings"] = distill_embeddings
    return d


def index_embeddings(m, d=3):
    """Row i is [i, i, ...] + 0.5, so that the surviving rows can be identified."""
    return np.repeat(np.arange(m, dtype=np.float32)[:, None] + 0.5, d, axis=1)


def mapper(augs, is_train=True, mask=False):
    return ViLDDatasetMapper(
        is_train=is_train, augmentations=augs, image_format="BGR", use_instance_mask=mask
    )


def colour_mask(image, colour):
    """image: (3, H, W) uint8 BGR tensor -> (H, W) bool, pixels (nearly) of ``colour``."""
    img = image.numpy().astype(np.int32)
    target = np.asarray(colour, dtype=np.int32)[:, None, None]
    return (np.abs(img - target) < 60).all(axis=0)


def assert_colour_in_box(image, box, colour, border=2):
    """Pixels well inside ``box`` are ``colour``; no pixel of ``colour`` lies outside it."""
    mask = colour_mask(image, colour)
    x0, y0, x1, y1 = [float(v) for v in box]
    ys, xs = np.nonzero(mask)
    # Pixel (x, y) covers [x, x + 1) x [y, y + 1); allow ``border`` px of interpolation.
    outside = (xs < x0 - border) | (xs + 1 > x1 + border)
    outside |= (ys < y0 - border) | (ys + 1 > y1 + border)
    assert not outside.any(), f"colour {colour} found outside {box}"
    ix0, iy0 = int(np.ceil(x0 + border)), int(np.ceil(y0 + border))
    ix1, iy1 = int(np.floor(x1 - border)), int(np.floor(y1 - border))
    if ix1 > ix0 and iy1 > iy0:
        assert mask[iy0:iy1, ix0:ix1].mean() > 0.95, f"box {box} is not filled with {colour}"


# --- 1. Pixels -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "augs, expected, out_hw",
    [
        ([], [RED_BOX], (H, W)),
        # Horizontal flip of width 80: x -> 80 - x.
        ([T.RandomFlip(prob=1.0)], [[40.0, 10.0, 60.0, 30.0]], (H, W)),
        # Resize 64x80 -> 96x120: x1.5.
        ([T.Resize((96, 120))], [[30.0, 15.0, 60.0, 45.0]], (96, 120)),
        # Flip then resize: [40, 10, 60, 30] * 1.5.
        ([T.RandomFlip(prob=1.0), T.Resize((96, 120))], [[60.0, 15.0, 90.0, 45.0]], (96, 120)),
        # Crop x in [30, 70), y in [5, 45): red -> [-10, 5, 10, 25] -> clipped [0, 5, 10, 25].
        ([T.CropTransform(30, 5, 40, 40)], [[0.0, 5.0, 10.0, 25.0]], (40, 40)),
    ],
)
def test_pixels_deterministic(image_file, augs, expected, out_hw):
    d = make_dict(image_file, [RED_BOX], index_embeddings(1))
    out = mapper(augs)(d)
    assert tuple(out["image"].shape[1:]) == out_hw
    distill = out["distill"]
    assert distill.image_size == out_hw
    assert distill.boxes.tensor.dtype == torch.float32
    assert torch.allclose(distill.boxes.tensor, torch.tensor(expected), atol=1e-4)
    assert_colour_in_box(out["image"], expected[0], RED)
    # The gt box of the same object went the same way.
    assert torch.allclose(out["instances"].gt_boxes.tensor, torch.tensor(expected), atol=1e-4)


def _check_all_squares(out, boxes_in):
    """Each surviving box is its square (by embedding row); dropped squares left no pixel."""
    colours = [RED, BLUE, GREEN]
    rows = [int(np.floor(v)) for v in out["distill"].embeddings[:, 0].tolist()]  # i + 0.5 -> i
    for box, i in zip(out["distill"].boxes.tensor.tolist(), rows):
        assert_colour_in_box(out["image"], box, colours[i])
    for i in set(range(len(boxes_in))) - set(rows):
        mask = colour_mask(out["image"], colours[i])
        # Only a sliver (< 1 px wide, thus dropped or interpolated away) may remain.
        assert mask.sum() <= 2 * max(mask.shape), f"square {i} dropped but still visible"


@pytest.mark.parametrize("seed", range(6))
def test_pixels_random_crop(image_file, seed):
    np.random.seed(seed)
    d = make_dict(image_file, [RED_BOX, BLUE_BOX], index_embeddings(2))
    out = mapper([T.RandomFlip(prob=0.5), T.RandomCrop("absolute", (40, 50))])(d)
    assert tuple(out["image"].shape[1:]) == (40, 50)
    _check_all_squares(out, [RED_BOX, BLUE_BOX])


def _lsj_cfg(mask_on=False):
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.MODEL.MASK_ON = mask_on
    cfg.MODEL.VILD.LSJ.ENABLED = True
    cfg.MODEL.VILD.LSJ.IMAGE_SIZE = 96
    cfg.MODEL.VILD.LSJ.MIN_SCALE = 0.5
    cfg.MODEL.VILD.LSJ.MAX_SCALE = 2.0
    return cfg


def test_pixels_lsj(image_file):
    m = ViLDDatasetMapper(_lsj_cfg(), is_train=True)
    boxes = [RED_BOX, BLUE_BOX, GREEN_BOX]
    n_dropped = 0
    for seed in range(16):
        np.random.seed(seed)
        out = m(make_dict(image_file, boxes, index_embeddings(3)))
        assert tuple(out["image"].shape[1:]) == (96, 96)
        assert out["distill"].image_size == (96, 96)
        _check_all_squares(out, boxes)
        n_dropped += 3 - len(out["distill"])
        # The gt annotation is the red square: if it survived, it equals the red distill box.
        rows = [int(np.floor(v)) for v in out["distill"].embeddings[:, 0].tolist()]
        if 0 in rows:
            assert torch.equal(
                out["instances"].gt_boxes.tensor[0], out["distill"].boxes.tensor[rows.index(0)]
            )
    assert n_dropped > 0, "no seed cropped a square away; the drop path is untested"


# --- 2. Dropped boxes take their embeddings with them ----------------------------------------


def test_crop_drops_boxes_and_embeddings(image_file):
    boxes = [
        RED_BOX,  # -> [0, 5, 10, 25]
        [2.0, 2.0, 12.0, 12.0],  # left of the crop: dropped
        BLUE_BOX,  # -> [20, 31, 40, 51] -> clipped [20, 31, 40, 40]
        [75.0, 50.0, 79.0, 63.0],  # right of the crop: dropped
        [70.0, 5.0, 80.0, 20.0],  # touches the crop's right edge: width 0, dropped
        [30.0, 44.0, 40.0, 60.0],  # -> [0, 39, 10, 55] -> [0, 39, 10, 40]: kept, 1 px high
    ]
    emb = np.eye(6, dtype=np.float32) * 2.0
    out = mapper([T.CropTransform(30, 5, 40, 40)])(make_dict(image_file, boxes, emb))
    distill = out["distill"]
    expected = [[0, 5, 10, 25], [20, 31, 40, 40], [0, 39, 10, 40]]
    assert torch.allclose(distill.boxes.tensor, torch.tensor(expected, dtype=torch.float32))
    expected_emb = np.eye(6, dtype=np.float32)[[0, 2, 5]] * 2.0
    assert torch.equal(distill.embeddings, torch.from_numpy(expected_emb))
    assert_colour_in_box(out["image"], expected[0], RED)
    assert_colour_in_box(out["image"], expected[1], BLUE)


def test_crop_drops_all(image_file):
    out = mapper([T.CropTransform(0, 40, 20, 20)])(
        make_dict(image_file, [RED_BOX, BLUE_BOX], index_embeddings(2, d=5))
    )
    assert len(out["distill"]) == 0
    assert tuple(out["distill"].embeddings.shape) == (0, 5)
    assert len(out["instances"]) == 0


# --- 3. Flip consistency (the official double-flip bug) --------------------------------------


def test_flip_consistency_many_seeds(image_file):
    # Non-integer, to compare the float paths too; the gt is given in XYXY_ABS like the
    # distillation boxes, so that the inputs are equal.
    box_in = [20.3, 10.7, 39.8, 30.8]
    flipped = 0
    m = mapper([T.RandomFlip(prob=0.5), T.Resize((96, 120))], mask=True)
    for seed in range(40):
        np.random.seed(seed)
        d = make_dict(image_file, [box_in], index_embeddings(1))
        d["annotations"][0].update(bbox=list(box_in), bbox_mode=BoxMode.XYXY_ABS)
        out = m(d)
        gt = out["instances"].gt_boxes.tensor
        box = out["distill"].boxes.tensor
        assert torch.equal(gt, box), f"seed {seed}: distill {box} != gt {gt}"
        # And both are where the red square is in this image.
        assert_colour_in_box(out["image"], box[0].tolist(), RED, border=3)
        flipped += bool(box[0, 0] > 45)  # unflipped x0 = 30.45, flipped x0 = 60.3
    assert 5 < flipped < 35, "RandomFlip(0.5) should flip some images and not others"


def test_flip_consistency_lsj_from_config(image_file):
    m = ViLDDatasetMapper(_lsj_cfg(), is_train=True)
    for seed in range(30):
        np.random.seed(seed)
        d = make_dict(image_file, [RED_BOX], index_embeddings(1))
        out = m(d)
        assert torch.equal(out["instances"].gt_boxes.tensor, out["distill"].boxes.tensor)


def test_lsj_with_masks_recomputes_gt_only(image_file):
    pytest.importorskip("shapely")  # detectron2 crops polygons with shapely
    m = ViLDDatasetMapper(_lsj_cfg(mask_on=True), is_train=True)
    for seed in range(10):
        np.random.seed(seed)
        out = m(make_dict(image_file, [RED_BOX], index_embeddings(1)))
        assert torch.allclose(
            out["instances"].gt_boxes.tensor, out["distill"].boxes.tensor, atol=1e-3
        )


# --- from_config -----------------------------------------------------------------------------


def test_from_config():
    m = ViLDDatasetMapper(_lsj_cfg(), is_train=True)
    augs = m.augmentations.augs
    assert [type(a) for a in augs] == [T.RandomFlip, T.ResizeScale, T.FixedSizeCrop]
    assert augs[0].horizontal and not augs[0].vertical
    assert (augs[1].min_scale, augs[1].max_scale) == (0.5, 2.0)
    assert (augs[1].target_height, augs[1].target_width) == (96, 96)
    assert tuple(augs[2].crop_size) == (96, 96)
    assert m.recompute_boxes is False
    assert ViLDDatasetMapper(_lsj_cfg(mask_on=True), is_train=True).recompute_boxes is True

    cfg = _lsj_cfg()
    cfg.INPUT.RANDOM_FLIP = "none"
    assert [type(a) for a in ViLDDatasetMapper(cfg, True).augmentations.augs] == [
        T.ResizeScale,
        T.FixedSizeCrop,
    ]
    # LSJ is for training only; off, detectron2's defaults apply.
    test_augs = ViLDDatasetMapper(_lsj_cfg(), is_train=False).augmentations.augs
    assert [type(a) for a in test_augs] == [T.ResizeShortestEdge]
    cfg.MODEL.VILD.LSJ.ENABLED = False
    assert [type(a) for a in ViLDDatasetMapper(cfg, True).augmentations.augs] == [
        T.ResizeShortestEdge
    ]


# --- 4. Empty cases --------------------------------------------------------------------------


def test_no_annotations_key(image_file):
    d = make_dict(image_file, [RED_BOX], index_embeddings(1), annotations=False)
    out = mapper([T.RandomFlip(prob=1.0)])(d)
    assert torch.equal(out["distill"].boxes.tensor, torch.tensor([[40.0, 10.0, 60.0, 30.0]]))
    assert len(out["instances"]) == 0
    # The caller's dict is untouched.
    assert "annotations" not in d and "distill_boxes" in d and "distill_embeddings" in d


def test_empty_annotations(image_file):
    d = make_dict(image_file, [RED_BOX], index_embeddings(1), annotations=False)
    d["annotations"] = []
    out = mapper([T.RandomFlip(prob=1.0)])(d)
    assert torch.equal(out["distill"].boxes.tensor, torch.tensor([[40.0, 10.0, 60.0, 30.0]]))
    assert torch.equal(out["distill"].embeddings, torch.full((1, 3), 0.5))
    assert len(out["instances"]) == 0


def test_zero_distill_boxes(image_file):
    out = mapper([])(make_dict(image_file, np.zeros((0, 4)), np.zeros((0, 7))))
    assert len(out["distill"]) == 0
    assert tuple(out["distill"].boxes.tensor.shape) == (0, 4)
    assert tuple(out["distill"].embeddings.shape) == (0, 7)
    assert len(out["instances"]) == 1

    out = mapper([])(make_dict(image_file, [], []))
    assert tuple(out["distill"].boxes.tensor.shape) == (0, 4)
    assert tuple(out["distill"].embeddings.shape) == (0, 0)


def test_no_distill_fields(image_file):
    out = mapper([])(make_dict(image_file))
    assert "distill" not in out and len(out["instances"]) == 1
    # Without distill fields it behaves as DatasetMapper: no annotations, no instances.
    out = mapper([])(make_dict(image_file, annotations=False))
    assert "distill" not in out and "instances" not in out


# --- 5. Bad input ----------------------------------------------------------------------------


def test_mismatched_counts(image_file):
    d = make_dict(image_file, [RED_BOX, BLUE_BOX], index_embeddings(3))
    with pytest.raises(ValueError, match=r"img\.png.*2.*3"):
        mapper([])(d)


@pytest.mark.parametrize("boxes", [[[1.0, 2.0, 3.0]], [1.0, 2.0, 3.0, 4.0], np.zeros((1, 4, 1))])
def test_bad_box_shape(image_file, boxes):
    with pytest.raises(ValueError, match=r"img\.png.*\(M, 4\)"):
        mapper([])(make_dict(image_file, boxes, index_embeddings(1)))


def test_only_one_field(image_file):
    with pytest.raises(ValueError, match=r"img\.png.*together"):
        mapper([])(make_dict(image_file, distill_boxes=[RED_BOX]))


# --- 6. Inference ----------------------------------------------------------------------------


def test_inference_drops_distill(image_file):
    d = make_dict(image_file, [RED_BOX], index_embeddings(1))
    out = mapper([T.Resize((96, 120))], is_train=False)(d)
    assert tuple(out["image"].shape[1:]) == (96, 120)
    for key in ("distill", "distill_boxes", "distill_embeddings", "annotations", "instances"):
        assert key not in out
    assert "distill_boxes" in d  # caller's dict untouched
