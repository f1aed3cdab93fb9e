"""trainer.images.decode_image through ImageFetcher: EXIF, modes, pixel limits, corrupt data; redact_url."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.fetch import ImageError
from ml_backend.netpolicy import redact_url
from trainer.images import decode_image

from tests.image_http import encode, loader, png_header_only, rgb_image


# ---- decoding ------------------------------------------------------------------


def test_exif_rotated_jpeg_is_transposed(ls):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red
    a[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    ls.serve("/data/upload/1/photo.jpg", encode(Image.fromarray(a), "JPEG", exif=exif, quality=95), "image/jpeg")
    arr = loader(ls).load("/data/upload/1/photo.jpg")
    assert arr.shape == (40, 20, 3)
    assert arr[3, 10, 0] > 200 and arr[3, 10, 2] < 50  # top is the old left (red)
    assert arr[-4, 10, 2] > 200 and arr[-4, 10, 0] < 50  # bottom is the old right (blue)


def test_palette_png():
    im = rgb_image().quantize(16)
    assert im.mode == "P"
    np.testing.assert_array_equal(decode_image(encode(im), 10**6), np.asarray(im.convert("RGB")))


def test_palette_with_transparency_composited_on_white():
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    arr = decode_image(encode(im), 10**6)
    assert arr.tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_gray_png():
    g = np.array([[0, 100], [200, 255]], np.uint8)
    arr = decode_image(encode(Image.fromarray(g, "L")), 10**6)
    assert arr.shape == (2, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(arr[:, :, c], g)


def test_one_bit_png():
    im = Image.new("1", (3, 1))
    im.putpixel((1, 0), 1)
    arr = decode_image(encode(im), 10**6)
    assert arr[0, :, 0].tolist() == [0, 255, 0]


def test_rgba_composited_on_white():
    a = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [255, 0, 0, 128]]], np.uint8)
    arr = decode_image(encode(Image.fromarray(a, "RGBA")), 10**6)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == [0, 0, 255]
    assert arr[0, 2, 0] == 255 and abs(int(arr[0, 2, 1]) - 127) <= 2 and abs(int(arr[0, 2, 2]) - 127) <= 2


def test_gray_alpha_png():
    la = Image.merge("LA", [Image.new("L", (1, 1), 0), Image.new("L", (1, 1), 0)])
    assert decode_image(encode(la), 10**6).tolist() == [[[255, 255, 255]]]


def test_16bit_png_scaled_by_actual_range():
    a = np.array([[1000, 2000], [3000, 5000]], np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    arr = decode_image(encode(im), 10**6)
    assert arr.dtype == np.uint8 and arr.shape == (2, 2, 3)
    assert arr[:, :, 0].tolist() == [[0, 64], [128, 255]]
    assert (arr[:, :, 0] == arr[:, :, 2]).all()


def test_32bit_int_tiff():
    a = np.array([[-5, 0, 5]], np.int32)
    arr = decode_image(encode(Image.fromarray(a, "I"), "TIFF"), 10**6)
    assert arr[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg():
    im = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    arr = decode_image(encode(im, "JPEG", quality=95), 10**6)
    assert arr.shape == (4, 4, 3)
    assert arr[0, 0, 0] > 200 and arr[0, 0, 1] < 60 and arr[0, 0, 2] < 60


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the check must not need it
def test_pixel_limit_refused_before_decoding(ls):
    ls.serve("/big.png", encode(rgb_image(20, 20)))
    with pytest.raises(ImageError, match="more than the limit of 100"):
        loader(ls, max_pixels=100).load("/big.png")
    # header claims 5000x5000 (under Pillow's own limit): refused by our check, never decoded
    with pytest.raises(ValueError, match="5000x5000"):
        decode_image(png_header_only(5000, 5000), 1_000_000)
    # over Pillow's MAX_IMAGE_PIXELS (~89.5 M): refused even if max_pixels is higher
    for side in (10_000, 100_000):
        with pytest.raises(ValueError, match="too large"):
            decode_image(png_header_only(side, side), 10**12)


def test_bomb_warning_is_an_error_outside_pytest():
    code = (
        "import warnings; from PIL import Image; import trainer.images;"
        "f = [x for x in warnings.filters if x[2] is Image.DecompressionBombWarning];"
        "assert f and f[0][0] == 'error', f"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_corrupt_bytes(ls):
    ls.serve("/junk.png", b"this is not an image at all")
    with pytest.raises(ImageError, match="not a recognizable image"):
        loader(ls).load("/junk.png")
    truncated = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)))
    ls.serve("/truncated.png", truncated[: len(truncated) // 2])
    with pytest.raises(ImageError, match="corrupt image data"):
        loader(ls).load("/truncated.png")


def test_malformed_exif_is_ignored():
    exif = Image.Exif()
    exif[0x0112] = 99  # not a valid orientation
    data = encode(rgb_image(), "JPEG", exif=exif, quality=95)
    assert decode_image(data, 10**6).shape == (6, 8, 3)


def test_html_login_page_is_not_an_image(ls):
    ls.serve("/data/upload/1/a.png", b"<html><body>Login</body></html>", "text/html")
    with pytest.raises(ImageError, match="not a recognizable image"):
        loader(ls).load("/data/upload/1/a.png")


def test_redact_url():
    assert redact_url("https://user:pw@h.example:8443/a.png?X-Amz-Signature=abc&d=x#frag") == (
        "https://h.example:8443/a.png?X-Amz-Signature=***&d=x"
    )
    assert redact_url("data:image/png;base64,AAAA") == "data:image/png;base64,..."
    assert redact_url("/data/local-files/?d=dir/a.png") == "/data/local-files/?d=dir/a.png"
