"""Image bytes -> RGB PIL image -> model input pixels.

Every failure is a `DecodeError` with a short reason; callers record it as an error row.

Choices, so that the same bytes always give the same pixels:
- EXIF orientation is applied, as a viewer would show the photo.
- Grayscale, palette, CMYK and YCbCr images are converted to RGB by PIL. CMYK uses PIL's plain
  formula; embedded ICC profiles are ignored.
- Transparency (alpha, LA, palette transparency) is composited on white: transparent pixels often
  hold arbitrary colour, and logos and product shots are drawn to be seen on a light background.
- 16-bit and 32-bit integer images are scaled to 8 bits, not clipped; float images in [0, 1] are
  scaled by 255.
- Animated GIF/WebP/TIFF: the first frame.
- JPEGs much larger than the model input are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
  (PIL's `draft`), never below `DRAFT_MARGIN` times the input size.
- Resizing and cropping follow open_clip's eval transform ("shortest": resize the short side, then
  centre-crop; "squash": resize to a square) with PIL's antialiased filters. Without draft scaling
  the pixels match open_clip's preprocessing to within 2 grey levels (0.4% of values differ at all
  on the sample photos; "squash" uses PIL itself and matches exactly).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Bump when a decoding choice above changes the pixels, so cached embeddings are recomputed.
DECODE_VERSION = 1

# Decode at reduced scale only while the reduced image keeps at least this many times the model's
# input size on its short side. The final bicubic resize then still averages over >= 1.5 pixels.
DRAFT_MARGIN = 1.5

# Pixels being decoded at once, across all decode threads: a 79 KB PNG can declare 81 megapixels
# (about 0.8 GB once decoded), and several threads decode at once. An image larger than the whole
# budget still decodes, alone.
DEFAULT_PIXEL_BUDGET = 256_000_000

RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")
_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_EXIF_ORIENTATION = 0x0112


class DecodeError(Exception):
    """Bytes that do not decode to an image; `reason` says why, in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Preprocessing:
    """How decoded images become model input: open_clip's eval transform, made explicit."""

    size: int
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    draft: bool = True  # reduced-scale JPEG decode for large sources
    draft_margin: float = DRAFT_MARGIN

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")

    def describe(self) -> dict:
        """Everything that determines the pixels, for shard metadata and cache keys."""
        described = asdict(self)
        if not self.draft:
            described["draft_margin"] = None
        return {
            **described,
            "decode_version": DECODE_VERSION,
            "alpha": "composite-on-white",
            "exif_orientation": True,
        }

    @property
    def id(self) -> str:
        """Short hash of `describe()`: changes whenever preprocessing changes."""
        text = json.dumps(self.describe(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class PixelBudget:
    """A count of decoded pixels shared by decode threads; `hold(n)` waits until n fit."""

    def __init__(self, limit: int = DEFAULT_PIXEL_BUDGET) -> None:
        if limit < 1:
            raise ValueError(f"the pixel budget must be at least 1, got {limit}")
        self.limit = limit
        self.in_use = 0
        self.peak = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.limit)  # one image over the budget decodes alone
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + pixels <= self.limit)
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= pixels
                self._changed.notify_all()


def load_image(
    data: bytes, *, target_size: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode `data` to an RGB image, EXIF-transposed, alpha composited on white.

    With `target_size`, large JPEGs decode at reduced scale, keeping at least
    ``DRAFT_MARGIN * target_size`` pixels on the short side. Images declaring more than
    `max_pixels` (default: PIL's ``Image.MAX_IMAGE_PIXELS``) are refused as decompression bombs
    before any pixel is decoded. Raises `DecodeError`.
    """
    draft_size = math.ceil(DRAFT_MARGIN * target_size) if target_size else None
    image, _, held = _decode(data, draft_size, max_pixels, None)
    held.close()
    return image


def decode_pixels(
    data: bytes,
    preprocessing: Preprocessing,
    *,
    max_pixels: int | None = None,
    budget: PixelBudget | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Bytes -> (size, size, 3) uint8 tensor of model input and the image's full (width, height).

    The full size is that of the stored image after EXIF rotation, whatever scale it was decoded
    at. Normalisation is left to `normalize`, on the model's device. With a `budget`, the image's
    decoded pixels are held from decoding to the end of the resize. Raises `DecodeError`.
    """
    draft_size = None
    if preprocessing.draft:
        draft_size = math.ceil(preprocessing.draft_margin * preprocessing.size)
    image, full_size, held = _decode(data, draft_size, max_pixels, budget)
    with held:
        return resize_and_crop(image, preprocessing), full_size


def resize_and_crop(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """RGB image -> (size, size, 3) uint8 tensor, as open_clip's eval Resize + CenterCrop would.

    For "shortest", torch's antialiased uint8 resize replaces PIL's: it implements PIL's filters
    (same kernels; within 2 grey levels) at about 3x PIL's speed.
    """
    size = preprocessing.size
    width, height = image.size
    if preprocessing.resize_mode == "squash":
        new_width, new_height = size, size
    elif width <= height:  # torchvision Resize(int): short side to `size`, long side truncated
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    if preprocessing.resize_mode == "squash":
        # With unequal scales per axis torch's uint8 path strays from PIL by up to 12 levels on
        # some pixels, so squashing stays with PIL.
        resample = _PIL_FILTERS[preprocessing.interpolation]
        image = image.resize((new_width, new_height), resample=resample)
        width, height = image.size
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (h, w, 3)
    if (new_width, new_height) != (width, height):
        channels_first = pixels.permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w), channels-last strides
        resized = torch.nn.functional.interpolate(
            channels_first,
            size=(new_height, new_width),
            mode=preprocessing.interpolation,
            antialias=True,
        )
        pixels = resized[0].permute(1, 2, 0)  # (new_h, new_w, 3)
    left = int(round((new_width - size) / 2.0))
    top = int(round((new_height - size) / 2.0))
    return pixels[top : top + size, left : left + size].contiguous()


def normalize(
    pixels: torch.Tensor, preprocessing: Preprocessing, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(b, h, w, 3) uint8 -> (b, 3, h, w) normalised `dtype`, computed where `pixels` lives.

    torchvision's ToTensor + Normalize, ``(x / 255 - mean) / std``, as one conversion and one fused
    multiply-add (equal to within 5e-7). The result keeps the channels-last memory of `pixels`
    (a permuted view, which convolutions take as is): a batch is tens of MB, and each extra pass
    over it costs as much as decoding an image.
    """
    mean = torch.tensor(preprocessing.mean, dtype=torch.float64)
    std = torch.tensor(preprocessing.std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).to(device=pixels.device, dtype=torch.float32)
    shift = (-mean / std).to(device=pixels.device, dtype=torch.float32)
    images = pixels.to(torch.float32)  # (b, h, w, 3)
    torch.addcmul(shift, images, scale, out=images)
    images = images.permute(0, 3, 1, 2)  # (b, 3, h, w) view
    return images if dtype == torch.float32 else images.to(dtype)


def _decode(
    data: bytes, draft_size: int | None, max_pixels: int | None, budget: PixelBudget | None
) -> tuple[Image.Image, tuple[int, int], contextlib.ExitStack]:
    """Decode to RGB; JPEGs at the smallest DCT scale keeping both sides >= `draft_size`.

    Returns the image, its full size, and the budget hold to release once its pixels are done
    with."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise DecodeError(f"decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image: format not recognised") from None
    except Exception as error:  # malformed headers raise all sorts (SyntaxError, struct.error, ...)
        raise DecodeError(f"unreadable image header: {type(error).__name__}: {error}") from None
    width, height = image.size
    if limit and width * height > limit:
        raise DecodeError(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{limit} (PIL.Image.MAX_IMAGE_PIXELS)"
        )
    if width < 1 or height < 1:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    orientation = _orientation(image)
    full_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    if draft_size and image.format in ("JPEG", "MPO"):
        image.draft("RGB", (draft_size, draft_size))
    held = contextlib.ExitStack()
    if budget is not None:  # the decoded size: after draft, before any copy
        held.enter_context(budget.hold(image.size[0] * image.size[1]))
    with _release_on_error(held):
        try:
            image.load()
        except Exception as error:  # truncated data, broken streams, bad tables
            raise DecodeError(
                f"corrupt or truncated image: {type(error).__name__}: {error}"
            ) from None
        if orientation not in (None, 1):
            # A broken EXIF block should not lose an otherwise good photo.
            with contextlib.suppress(Exception):
                image = ImageOps.exif_transpose(image)
        try:
            return _to_rgb(image), full_size, held
        except Exception as error:
            raise DecodeError(
                f"cannot convert {image.mode} image to RGB: {type(error).__name__}: {error}"
            ) from None


@contextlib.contextmanager
def _release_on_error(held: contextlib.ExitStack) -> Iterator[None]:
    try:
        yield
    except BaseException:
        held.close()
        raise


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(_EXIF_ORIENTATION)
    except Exception:
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(image)
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit RGB by scaling, not clipping."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    elif image.mode.startswith("I;16") or (values.size and np.nanmax(values) > 255):
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    gray = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
