"""The server's image decoding (vild_d2/serve/service.py, decode_image): a 16-bit grayscale
upload is read as value // 257, the rule of the command-line tools and the runtime, not clipped
at 255 by PIL's RGB conversion (which made every value above 255 white)."""

import vild_d2  # noqa: F401  (first: compat bridges)

import io

import cv2
import numpy as np

from vild_d2.serve.service import Limits, decode_image


def test_a_16_bit_grayscale_png_is_value_over_257(tmp_path):
    values = np.array([[0, 256, 257, 1000], [30000, 65000, 65534, 65535]] * 4, dtype=np.uint16)
    values = np.tile(values, (1, 4))  # 8 x 16 px
    path = tmp_path / "gray16.png"
    assert cv2.imwrite(str(path), values)
    got = decode_image(path.read_bytes(), "gray16.png", Limits())
    # Hand-worked: 0, 0, 1, 3; 116, 252, 254, 255 (v // 257), on all three channels.
    expected = np.array([[0, 0, 1, 3], [116, 252, 254, 255]] * 4, dtype=np.uint8)
    expected = np.tile(expected, (1, 4))
    assert got.dtype == np.uint8 and got.shape == (8, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[:, :, c], expected)


def test_an_8_bit_colour_png_is_unchanged(tmp_path):
    bgr = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    ok, data = cv2.imencode(".png", bgr)
    assert ok
    np.testing.assert_array_equal(
        decode_image(io.BytesIO(data.tobytes()).read(), "c.png", Limits()), bgr
    )
