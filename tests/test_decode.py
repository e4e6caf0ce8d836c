"""Decoding real and deliberately awkward files: every one gives RGB pixels or a DecodeError."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from inmap.decode import (
    DRAFT_MARGIN,
    DecodeError,
    Preprocessing,
    decode_pixels,
    load_image,
    normalize,
)


def _encode(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def _two_halves(size=(60, 40), left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    """An image whose left half is `left` and right half `right`, so rotations are visible."""
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def _close(pixel, expected, tolerance=12) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected, strict=True))


def test_exif_orientation_is_applied():
    raw = _two_halves()  # stored 60x40: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge ends up on top
    data = _encode(raw, "JPEG", exif=exif.tobytes(), quality=95)

    image = load_image(data)
    pixels, full_size = decode_pixels(data, Preprocessing(size=40, draft=False))

    assert image.mode == "RGB" and image.size == (40, 60)
    assert _close(image.getpixel((20, 5)), (255, 0, 0))
    assert _close(image.getpixel((20, 55)), (0, 0, 255))
    assert full_size == (40, 60)
    assert pixels.shape == (40, 40, 3)


def test_cmyk_jpeg_becomes_rgb():
    cyan = Image.new("CMYK", (32, 32), (255, 0, 0, 0))

    image = load_image(_encode(cyan, "JPEG", quality=95))

    assert image.mode == "RGB"
    assert _close(image.getpixel((16, 16)), (0, 255, 255))


def test_grayscale_jpeg_becomes_rgb_with_equal_channels():
    image = load_image(_encode(Image.new("L", (16, 16), 90), "JPEG"))

    assert image.mode == "RGB"
    r, g, b = image.getpixel((8, 8))
    assert r == g == b and abs(r - 90) <= 2


def test_palette_png_with_transparency_is_composited_on_white():
    palette_image = Image.new("P", (20, 10), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # 0 black, 1 red
    palette_image.paste(1, (10, 0, 20, 10))
    data = _encode(palette_image, "PNG", transparency=0)

    image = load_image(data)

    assert image.mode == "RGB"
    assert image.getpixel((2, 5)) == (255, 255, 255)  # transparent black shows as white
    assert image.getpixel((15, 5)) == (255, 0, 0)


def test_la_and_rgba_alpha_are_composited_on_white():
    la = Image.new("LA", (10, 10), (0, 0))
    la.paste((40, 255), (5, 0, 10, 10))
    rgba = Image.new("RGBA", (10, 10), (0, 0, 255, 128))  # half-transparent blue

    la_image = load_image(_encode(la, "PNG"))
    rgba_image = load_image(_encode(rgba, "PNG"))

    assert la_image.getpixel((1, 1)) == (255, 255, 255)
    assert la_image.getpixel((8, 8)) == (40, 40, 40)
    assert _close(rgba_image.getpixel((5, 5)), (127, 127, 255), tolerance=2)


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = np.full((8, 16), 65535, dtype=np.uint16)
    values[:, 8:] = 32896  # 128 * 257
    sixteen = Image.fromarray(values)
    data = _encode(sixteen, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit

    image = load_image(data)

    assert image.getpixel((2, 2)) == (255, 255, 255)
    assert image.getpixel((12, 2)) == (128, 128, 128)


@pytest.mark.parametrize("format", ["PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_other_listed_formats_decode(format):
    image = load_image(_encode(_two_halves(), format))

    assert image.mode == "RGB" and image.size == (60, 40)
    assert _close(image.getpixel((5, 20)), (255, 0, 0), tolerance=40)


def test_truncated_real_jpeg_is_a_decode_error(real_images):
    data = real_images[0].read_bytes()

    with pytest.raises(DecodeError, match="truncated"):
        load_image(data[: len(data) // 2])


def test_jpeg_with_scrambled_headers_is_a_decode_error(real_images):
    data = real_images[1].read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, size=len(data) - 300, dtype=np.uint8)
    scrambled = data[:300] + noise.tobytes()  # SOI and the first segments survive, tables do not

    with pytest.raises(DecodeError):
        decode_pixels(scrambled, Preprocessing(size=64))


def test_text_file_named_jpg_is_a_decode_error():
    with pytest.raises(DecodeError, match="not an image"):
        load_image(b"hello, I am a text file named photo.jpg\n")


def test_zero_byte_file_is_a_decode_error():
    with pytest.raises(DecodeError, match="empty"):
        load_image(b"")


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but which holds almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_before_decoding():
    start = time.perf_counter()

    with pytest.raises(DecodeError, match="decompression bomb"):
        load_image(_png_declaring(100_000, 100_000))

    assert time.perf_counter() - start < 1.0


def test_images_over_the_pixel_limit_are_refused(sample_images):
    data = sample_images[0].read_bytes()
    width, height = Image.open(io.BytesIO(data)).size

    with pytest.raises(DecodeError, match="decompression bomb"):
        load_image(data, max_pixels=width * height - 1)
    assert load_image(data, max_pixels=width * height).size == (width, height)


def test_pil_limit_applies_by_default(sample_images, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)

    with pytest.raises(DecodeError, match="decompression bomb"):
        load_image(sample_images[0].read_bytes())


def test_large_jpeg_is_draft_decoded_but_reports_its_full_size(sample_images):
    photo = Image.open(sample_images[2]).convert("RGB")
    large = photo.resize((photo.width * 4, photo.height * 4), Image.Resampling.BICUBIC)
    data = _encode(large, "JPEG", quality=90)

    drafted = load_image(data, target_size=64)
    pixels, full_size = decode_pixels(data, Preprocessing(size=64))

    assert min(drafted.size) < min(large.size) / 2  # decoded at reduced scale
    assert min(drafted.size) >= DRAFT_MARGIN * 64  # but never below the margin
    assert full_size == large.size
    assert pixels.shape == (64, 64, 3) and pixels.dtype == torch.uint8
    assert load_image(data).size == large.size  # no target: full decode


def _open_clip_reference(image: Image.Image, size: int, resize_mode: str) -> torch.Tensor:
    transform = open_clip.image_transform(size, is_train=False, resize_mode=resize_mode)
    return transform(image)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_pixels_match_open_clip_preprocessing_without_draft(sample_images, resize_mode):
    preprocessing = Preprocessing(size=224, resize_mode=resize_mode, draft=False)
    photos = [path.read_bytes() for path in sample_images[:12]] + [
        path.read_bytes() for path in sample_images if "Indian_cobra" in path.name
    ]
    small = _encode(Image.open(io.BytesIO(photos[0])).convert("RGB").resize((40, 56)), "PNG")

    for data in [*photos, small]:  # landscape, portrait, and an image smaller than the input
        pixels, _ = decode_pixels(data, preprocessing)
        ours = normalize(pixels[None], preprocessing)[0]
        reference = _open_clip_reference(Image.open(io.BytesIO(data)), 224, resize_mode)
        assert ours.shape == reference.shape == (3, 224, 224)
        # Within 2 grey levels everywhere, and nearly always identical.
        difference = (ours - reference).abs() * torch.tensor(preprocessing.std).view(3, 1, 1) * 255
        assert difference.max() <= 2.01
        assert difference.mean() < 0.05


def test_normalize_matches_torchvision_to_tensor_and_normalize(sample_images):
    preprocessing = Preprocessing(size=224, draft=False)
    pixels, _ = decode_pixels(sample_images[3].read_bytes(), preprocessing)
    transform = open_clip.image_transform(224, is_train=False)

    reference = transform.transforms[-1](transform.transforms[-2](Image.fromarray(pixels.numpy())))

    torch.testing.assert_close(
        normalize(pixels[None], preprocessing)[0], reference, atol=1e-6, rtol=0
    )


def test_preprocessing_id_changes_with_what_shapes_the_pixels():
    base = Preprocessing(size=224)
    changed = [
        Preprocessing(size=336),
        Preprocessing(size=224, resize_mode="squash"),
        Preprocessing(size=224, draft=False),
        Preprocessing(size=224, mean=(0.5, 0.5, 0.5)),
    ]

    assert base.id == Preprocessing(size=224).id
    assert len({base.id, *(p.id for p in changed)}) == 5
