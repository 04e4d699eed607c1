"""decode_image: every mode to RGB, EXIF, bomb limit, and short reasons for bad bytes."""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from shards.decode import BadImage, decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "JPEG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("I;16", "PNG"),
        ("I", "TIFF"),
        ("F", "TIFF"),
        ("1", "PNG"),
        ("PA", "TIFF"),
        ("YCbCr", "TIFF"),
        ("LAB", "TIFF"),
        ("RGB", "WEBP"),
        ("RGB", "GIF"),
        ("RGB", "BMP"),
    ],
)
def test_every_mode_becomes_rgb(mode, fmt):
    img = noise(7, 5).convert(mode) if mode not in ("I;16", "I", "F") else Image.new(mode, (7, 5))
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB"
    assert out.size == (7, 5)


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (200, 10, 10, 255))
    out = decode_image(encode(img, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white, not black
    assert out.getpixel((1, 0)) == (200, 10, 10)


def test_la_and_palette_transparency_composite_on_white():
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (40, 255))
    out = decode_image(encode(la, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (40, 40, 40)

    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((1, 0), 1)
    data = encode(p, "PNG", transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    out = decode_image(data)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (10, 200, 30)


def test_sixteen_bit_uses_the_full_range():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = np.asarray(decode_image(encode(img, "PNG")))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_float_in_unit_range_is_scaled():
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = np.asarray(decode_image(encode(Image.fromarray(arr), "TIFF")))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied():
    img = noise(8, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (4, 8)


def test_one_pixel_is_valid():
    out = decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (1, 2, 3)


def test_bad_bytes_have_short_reasons():
    jpeg = encode(noise(), "JPEG")
    cases = {
        b"": "zero bytes",
        b"hello, this is not an image" * 4: "not an image",
        jpeg[: len(jpeg) // 2]: "truncated JPEG",
        jpeg[:10]: "truncated",
    }
    for data, reason in cases.items():
        with pytest.raises(BadImage, match=reason) as err:
            decode_image(data)
        assert len(str(err.value)) <= 120


def test_corrupt_png_data_is_reported():
    png = bytearray(encode(noise(), "PNG"))
    start = png.index(b"IDAT") + 8
    png[start : start + 200] = b"\x00" * 200  # breaks the zlib stream (and the CRC)
    with pytest.raises(BadImage):
        decode_image(bytes(png))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries (almost) no pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [9_000, 20_000, 100_000])
def test_decompression_bomb_is_refused_without_warnings(side):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImage, match="too many pixels"):
            decode_image(png_header_only(side, side))


def test_pixel_limit_is_configurable():
    data = encode(noise(64, 48), "PNG")
    with pytest.raises(BadImage, match="too many pixels"):
        decode_image(data, max_pixels=1000)
    assert decode_image(data, max_pixels=64 * 48).size == (64, 48)


def test_multi_frame_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0)
