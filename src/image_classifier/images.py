"""One image file → uint8 C×H×W of a model's input shape, the same way at training time and at prediction time.

preprocess (a folder data set) and `predict` both call `read_image` (or `read_array`, its numpy form), so a model
never sees one resize in training and another in use. Every file is first decoded to 8-bit RGB the same way
whatever its format: EXIF rotation applied, transparency composited onto white, 16-bit samples scaled, CMYK and
palettes converted.

Pillow, simplejpeg and numpy only, no torch (imported by `read_image` alone): decoding.py runs `read_array` in
threads for `predict` and in worker processes for preprocess, which must start without torch, and torch must not
be asked for work from many threads at once (its own thread pool would compete with them). A JPEG at least twice
the target size is decoded at 1/2, 1/4 or 1/8 scale (libjpeg-turbo's DCT scaling): less work, and the resize
that follows averages fewer pixels.
"""

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from image_classifier.errors import UserError, one_line

if TYPE_CHECKING:
    import torch

# Refuse images that would decode to more than this many pixels (a decompression bomb exhausts memory).
MAX_PIXELS = 40_000_000
# Lossy WebP stores a grey image as colour and decodes it 1 level off here and there: still grey.
GREY_TOLERANCE = 2
# 16-bit grey modes (TIFF, PNG): PIL's convert to 8 bits clips them instead of scaling.
_PIL_16_BIT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# JPEG-family formats whose decoder can scale down by 2, 4 or 8 while decoding (MPO: JPEG from cameras).
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})


def read_image(path: Path, channels: int | Literal["auto"], size: tuple[int, int]) -> "torch.Tensor":
    """Decode `path` as uint8 `channels`×H×W (1 grey, 3 RGB; "auto": 1 when the image is grey, else 3) resized
    to `size` = (H, W), bilinear antialiased.

    Raises UserError naming the file when it is missing, not an image, corrupt, or too large to decode safely."""
    import torch  # here: decoding.py's worker processes import this module and must not load torch

    return torch.from_numpy(read_array(path, channels, size))


def read_array(path: Path, channels: int | Literal["auto"], size: tuple[int, int]) -> np.ndarray:
    """`read_image` as a numpy array, touching neither torch nor anything shared: safe in any thread."""
    plain_jpeg = _turbo_decoded(path, max(size))
    if plain_jpeg is not None:
        return fit_array(plain_jpeg, channels, size)
    return pillow_array(path, channels, size)


def pillow_array(path: Path, channels: int | Literal["auto"], size: tuple[int, int]) -> np.ndarray:
    """`read_array` through Pillow alone, for every format it reads."""
    with _decoded(path, max(size)) as image:
        if channels != 1 and not _may_be_grey(image):
            # A colour image is resized before it becomes an array: copying a full-size photo out of Pillow
            # cost more than decoding it. The pixels are fit_array's.
            height, width = size
            return np.ascontiguousarray(np.asarray(_resize_image(image, (width, height))).transpose(2, 0, 1))
        return fit_array(np.asarray(image), channels, size)


def decode_rgb_array(path: Path, at_least: int | None = None) -> np.ndarray:
    """The file's pixels as uint8 H×W×3 RGB, upright, transparent areas white; a JPEG whose sides are both at
    least twice `at_least` comes at a reduced scale whose sides stay at least `at_least`."""
    with _decoded(path, at_least) as image:
        return np.asarray(image)


def _turbo_decoded(path: Path, at_least: int) -> np.ndarray | None:
    """A plain JPEG (YCbCr or grey, no EXIF block and so no rotation to apply) decoded straight by libjpeg-turbo
    (simplejpeg), at the reduced scale Pillow's `draft` picks: the pixels of the Pillow path below, without
    Pillow's Python-side parsing of the file (a 128-px JPEG in 74 instead of 250 us here). None for any other file,
    or one this decoder refuses: the Pillow path decodes it, or names what is wrong with it."""
    import simplejpeg  # here: only decoding needs it

    try:
        with path.open("rb") as file:
            data = file.read()
        if not data.startswith(b"\xff\xd8") or _has_exif(data):
            return None
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or height * width > MAX_PIXELS:
            return None
        scale = _draft_scale(width, height, at_least)
        return simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=-(-height // scale), min_width=-(-width // scale)
        )
    except (OSError, ValueError):
        return None


def _draft_scale(width: int, height: int, at_least: int) -> int:
    """The 1/1, 1/2, 1/4 or 1/8 scale at which `Image.draft(None, (at_least, at_least))` decodes a JPEG."""
    fits = min(width // at_least, height // at_least)
    return next(scale for scale in (8, 4, 2, 1) if fits >= scale or scale == 1)


def _has_exif(jpeg: bytes) -> bool:
    """Whether the JPEG's header segments (before the image data) hold an EXIF block, which may ask for a
    rotation; a header this walk cannot follow counts as one (the Pillow path then reads it)."""
    position = 2
    while position + 4 <= len(jpeg):
        if jpeg[position] != 0xFF:
            return True
        marker = jpeg[position + 1]
        if marker == 0xDA:  # start of scan: the header is over
            return False
        if marker == 0xE1 and jpeg[position + 4 : position + 10] == b"Exif\x00\x00":
            return True
        position += 2 + int.from_bytes(jpeg[position + 2 : position + 4], "big")
    return True


@contextlib.contextmanager
def _decoded(path: Path, at_least: int | None) -> Iterator[Image.Image]:
    """decode_rgb_array's pixels as a Pillow image in RGB mode, for the with block (the file closes after it)."""
    try:
        with _opened(path) as image:
            if at_least and image.format in _DRAFT_FORMATS:
                # Before EXIF rotation, so both sides must stay above the target's larger side.
                image.draft(None, (at_least, at_least))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: upright images are not copied
            plain = image.mode == "RGB" and not image.has_transparency_data
            yield image if plain else Image.fromarray(_rgb(image))
    except UserError:
        raise
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as error:  # damage shows in decoding
        raise UserError(f"{path}: image data is corrupt or truncated ({_decoder_failure(error)})") from None


def fit_array(rgb: np.ndarray, channels: int | Literal["auto"], size: tuple[int, int]) -> np.ndarray:
    """uint8 H×W×3 RGB → `channels`×`size`. A grey image is resized as one channel, its luma, so its pixels are
    the same whether the model takes 1 or 3 channels, or "auto" chose either."""
    height, width = size
    if channels == 1 or is_grey(rgb):
        small = _resize(_luma(rgb), (width, height))[None]
        return np.ascontiguousarray(np.broadcast_to(small, (3, height, width))) if channels == 3 else small
    return np.ascontiguousarray(_resize(rgb, (width, height)).transpose(2, 0, 1))


def is_grey(rgb: np.ndarray) -> bool:
    """True when no pixel's red, green and blue (H×W×3) differ by more than GREY_TOLERANCE: a grey photo saved
    as RGB is grey too. A colour image is usually told by every 8th pixel of every 8th row, before the whole."""
    return _channel_spread(rgb[::8, ::8]) <= GREY_TOLERANCE and _channel_spread(rgb) <= GREY_TOLERANCE


def _may_be_grey(image: Image.Image) -> bool:
    """False when one pixel of every 8 by 8 already shows colour (most photos): is_grey could only say False."""
    width, height = image.size
    sample = image.resize((max(1, width // 8), max(1, height // 8)), Image.Resampling.NEAREST)
    return _channel_spread(np.asarray(sample)) <= GREY_TOLERANCE


def _channel_spread(rgb: np.ndarray) -> int:
    """The largest difference between two channels of one pixel. Element-wise maxima of the three channel
    planes: numpy's max over a last axis of 3 took 0.8 ms of a 1.1-ms decode of a 128-px JPEG."""
    red, green, blue = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    return int(spread.max(initial=0))


def _rgb(image: Image.Image) -> np.ndarray:
    """A PIL image as uint8 H×W×3 RGB: 16-bit grey scaled (not clipped), transparency onto white."""
    if image.mode in _PIL_16_BIT:
        grey = (np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.has_transparency_data:  # RGBA, LA, PA, or a palette or colour marked transparent
        return _on_white(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB"))  # also grey, CMYK, palette, 1-bit


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA onto white, as image viewers do: the colour under a transparent pixel is often garbage
    (or black), which dropping alpha would show the model."""
    alpha = rgba[:, :, 3:].astype(np.int32)
    if bool((alpha == 255).all()):
        return np.ascontiguousarray(rgba[:, :, :3])
    blended = (rgba[:, :, :3].astype(np.int32) * alpha + 255 * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (PIL's "L") in integers, rounded: a float version turns white into 254."""
    r, g, b = (rgb[:, :, i].astype(np.int32) for i in range(3))
    return ((r * 299 + g * 587 + b * 114 + 500) // 1000).astype(np.uint8)


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear, antialiased when shrinking (Pillow widens the filter by the scale), to `size` = (W, H)."""
    if pixels.shape[1::-1] == size:  # already the size: no round trip through Pillow
        return pixels
    return np.array(_resize_image(Image.fromarray(pixels), size))


def _resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


class _opened:
    """`Image.open(path)` after checking its pixel count from the header (nothing decoded yet), as a context
    manager; every way a file can fail to open becomes a UserError naming it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Image.Image:
        path = self.path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below is stricter
                self.image = Image.open(path)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise UserError(f"{path}: is a folder, not an image") from None
        except UnidentifiedImageError:
            raise UserError(f"{path}: not an image file PIL can read") from None
        except Image.DecompressionBombError:
            raise UserError(self._too_large()) from None
        except (OSError, SyntaxError) as error:
            raise UserError(
                f"{path}: image data is corrupt or truncated ({_decoder_failure(error)})"
            ) from None
        if self.image.width * self.image.height > MAX_PIXELS:
            self.image.close()
            raise UserError(self._too_large())
        return self.image

    def __exit__(self, *exc: object) -> None:
        self.image.close()

    def _too_large(self) -> str:
        return f"{self.path}: image is too large (over {MAX_PIXELS:,} pixels); refusing to decode it"


def _decoder_failure(error: BaseException) -> str:
    """A decoder's message in a few words, without the C++ source location some decoders begin it with."""
    return re.sub(r"^.*?\.cpp:\d+, ", "", one_line(error, limit=None))[:160]
