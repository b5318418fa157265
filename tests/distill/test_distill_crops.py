"""Fast (batched RoIAlign) crops vs CLIP's own PIL preprocess: pixels and embeddings.

Expected pixels are worked out by hand on a linear-gradient image, where resampling at any
point gives the gradient's value there; embeddings are compared with the one-crop-at-a-time
reference through a real-size (ViT-B/32-shaped, random-weight) CLIP.
"""

import vild_d2  # noqa: F401  (compat bridges first)

import numpy as np
import pytest
import torch
from clip.model import CLIP
from PIL import Image
from skimage import data as skdata

from vild_d2.distill.crops import CLIP_MEAN, CLIP_STD, context_boxes, fast_crops, reference_crops
from vild_d2.distill.teacher import CLIPTeacher, encode_crops
from vild_d2.text import load_clip

H, W = 60, 100


def gradient_image():
    """(3, H, W) uint8: R = 2x, G = 3y, B = 50 + x + y at pixel (x, y) (all integers < 256)."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    img = np.stack([2 * x, 3 * y, 50 + x + y])
    assert img.max() < 256
    return torch.from_numpy(img.astype(np.uint8))


def expected_gradient_crop(square, size):
    """The normalised crop of the gradient image over ``square`` (x0, y0, x1, y1), in float64:
    output pixel (i, j) samples the continuous point at the centre of its bin; pixel x covers
    [x, x + 1), so continuous u has value 2 * (u - 0.5) etc."""
    x0, y0, x1, y1 = square
    u = x0 + (np.arange(size) + 0.5) * (x1 - x0) / size - 0.5  # in pixel-index units
    v = y0 + (np.arange(size) + 0.5) * (y1 - y0) / size - 0.5
    vv, uu = np.meshgrid(v, u, indexing="ij")
    rgb = np.stack([2 * uu, 3 * vv, 50 + uu + vv]) / 255.0
    mean = np.asarray(CLIP_MEAN)[:, None, None]
    std = np.asarray(CLIP_STD)[:, None, None]
    return (rgb - mean) / std


def test_fast_crops_pixels_on_gradient():
    image = gradient_image()
    size = 16
    boxes = torch.tensor([[20.0, 10.0, 60.0, 30.0], [80.0, 40.0, 100.0, 60.0]])
    out = fast_crops(image, boxes, scales=(1.0, 1.5), size=size)
    assert out.shape == (4, 3, size, size) and out.dtype == torch.float32
    # By hand: box 0 (40 x 20, centre (40, 20)) -> square of side 20; at 1.5x it is 60 x 30,
    # square of side 30. Box 1 at 1.5x is [75, 35, 105, 65], clipped to [75, 35, 100, 60]:
    # 25 x 25 (its 1x square is [80, 40, 100, 60]). Scale-major order.
    squares = [
        (30.0, 10.0, 50.0, 30.0),
        (80.0, 40.0, 100.0, 60.0),
        (25.0, 5.0, 55.0, 35.0),
        (75.0, 35.0, 100.0, 60.0),
    ]
    for k, sq in enumerate(squares):
        expected = expected_gradient_crop(sq, size)
        got = out[k].double().numpy()
        if sq[2] == W:
            # Samples within half a pixel of the image border are clamped to the last pixel
            # (the gradient is not extrapolated): compare the rest.
            got, expected = got[..., :-1, :-1], expected[..., :-1, :-1]
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"crop {k} {sq}")


def test_context_boxes_by_hand():
    boxes = torch.tensor([[10.0, 10.0, 30.0, 50.0]])
    out = context_boxes(boxes, (1.0, 2.0), height=40, width=35)
    # 2x: centre (20, 30), half (10, 20) -> [0, 10, 40, 50] -> clipped to [0, 0, 35, 40].
    assert torch.equal(out, torch.tensor([[10.0, 10.0, 30.0, 40.0], [0.0, 0.0, 35.0, 40.0]]))


def test_fast_crops_shapes_and_errors():
    image = gradient_image()
    assert fast_crops(image, torch.zeros(0, 4), size=8).shape == (0, 3, 8, 8)
    out = fast_crops(image, torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3), scales=(1.0,), size=8)
    assert out.shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        fast_crops(image.permute(1, 2, 0), torch.zeros(1, 4))


def test_fast_matches_reference_pixels_on_photo():
    """Same region, resampled by RoIAlign vs PIL bicubic: close pixel by pixel."""
    rgb = skdata.astronaut()[::2, ::2].copy()  # 256 x 256
    boxes = torch.tensor([[30.0, 20.0, 130.0, 90.0], [100.4, 100.6, 230.2, 250.9]])
    fast = fast_crops(torch.from_numpy(rgb).permute(2, 0, 1), boxes, size=64)
    ref = reference_crops(Image.fromarray(rgb), boxes, size=64)
    assert fast.shape == ref.shape == (4, 3, 64, 64)
    diff = (fast - ref).abs().mean(dim=(1, 2, 3))
    # In normalised units (1/255 is ~0.015): the two differ only by the resampling filter
    # (bicubic vs RoIAlign's bilinear average), ~5/255 on average on this textured photo.
    assert diff.max() < 0.16, diff
    # The same crop 4 px to the right already differs clearly more.
    shifted = fast_crops(torch.from_numpy(rgb).permute(2, 0, 1), boxes + 4.0, size=64)
    assert ((shifted - ref).abs().mean(dim=(1, 2, 3)) > 1.5 * diff).all()


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=32,
        context_length=77,
        vocab_size=49408,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    )
    return model.eval()


def test_embeddings_agree_with_reference_vit_b32(vit_b32):
    rgb = skdata.astronaut()  # 512 x 512
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(9, 2, generator=g) * 450
    boxes = torch.cat([xy, (xy + torch.rand(9, 2, generator=g) * 300 + 8).clamp(max=512)], 1)
    extra = torch.tensor(
        [[10.3, 20.7, 30.2, 200.9], [100.0, 100.0, 500.0, 140.0], [0, 0, 512, 512]]
    )
    boxes = torch.cat([boxes, extra])
    fast = fast_crops(torch.from_numpy(rgb).permute(2, 0, 1), boxes)
    ref = reference_crops(Image.fromarray(rgb), boxes)
    e_fast = encode_crops(vit_b32, fast, num_scales=2)
    e_ref = encode_crops(vit_b32, ref, num_scales=2)
    assert e_fast.shape == (12, 512)
    cos = e_fast @ e_ref.T
    assert cos.diagonal().min() >= 0.99, cos.diagonal()
    # The figure means something: other boxes are clearly further apart than the same box.
    off = cos[~torch.eye(12, dtype=torch.bool)]
    assert off.max() < cos.diagonal().min() - 0.005, (off.max(), cos.diagonal().min())


def test_encode_crops_sums_normalised_scales(tiny_clip_path):
    model, _ = load_clip(tiny_clip_path)
    torch.manual_seed(0)
    crops = torch.randn(6, 3, 32, 32)  # 2 scales x 3 boxes, scale-major
    out = encode_crops(model, crops, num_scales=2, batch_size=4)
    # float64 reference, one crop at a time.
    per = torch.stack([model.encode_image(c[None])[0].double() for c in crops])
    per = per / per.norm(dim=1, keepdim=True)
    expected = per[:3] + per[3:]
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert out.shape == (3, 32)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_teacher_settings(tiny_clip_path):
    teacher = CLIPTeacher(tiny_clip_path)
    settings = teacher.settings()
    assert settings["embed_dim"] == 32
    assert settings["crops"]["scales"] == [1.0, 1.5] and settings["crops"]["size"] == 32
    emb = teacher(gradient_image(), torch.tensor([[20.0, 10.0, 60.0, 30.0]]))
    assert emb.shape == (1, 32)
    assert torch.allclose(emb.norm(dim=1), torch.ones(1))
