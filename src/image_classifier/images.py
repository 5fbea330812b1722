"""One image file → uint8 C×H×W of a model's input shape, the same way at training time and at prediction time.

preprocess (a folder data set) and `predict` both call `read_image`, so a model never sees one resize in training
and another in use. Every file is first decoded to 8-bit RGB the same way whatever its format: EXIF rotation
applied, transparency composited onto white, 16-bit samples scaled, CMYK and palettes converted.
"""

import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from image_classifier.errors import UserError

# Refuse images that would decode to more than this many pixels (a decompression bomb exhausts memory).
MAX_PIXELS = 40_000_000
# Formats torchvision's own decoders read, rotated by EXIF and with alpha. PIL decodes the rest: torchvision's
# WebP decoder ignores EXIF rotation and its GIF decoder ignores transparency.
_TORCHVISION_FORMATS = frozenset({"PNG", "JPEG", "MPO"})  # MPO: JPEG from cameras
# Lossy WebP stores a grey image as colour and decodes it 1 level off here and there: still grey.
GREY_TOLERANCE = 2
# 16-bit grey modes (TIFF): PIL's convert to 8 bits clips them instead of scaling.
_PIL_16_BIT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def read_image(path: Path, channels: int | Literal["auto"], size: tuple[int, int]) -> torch.Tensor:
    """Decode `path` as uint8 `channels`×H×W (1 grey, 3 RGB; "auto": 1 when the image is grey, else 3) resized
    to `size` = (H, W), bilinear antialiased.

    Raises UserError naming the file when it is missing, not an image, corrupt, or too large to decode safely."""
    return fit_image(decode_rgb(path), channels, size)


def decode_rgb(path: Path) -> torch.Tensor:
    """The file's pixels as uint8 3×H×W RGB at full size, upright, transparent areas white."""
    image_format = _checked_format(path)
    try:
        if image_format in _TORCHVISION_FORMATS:
            data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
            # RGB mode would drop alpha and show what a transparent pixel happens to hold; JPEG has no alpha.
            mode = ImageReadMode.RGB_ALPHA if image_format == "PNG" else ImageReadMode.RGB
            pixels = decode_image(data, mode=mode, apply_exif_orientation=True)
        else:
            with Image.open(path) as image:
                pixels = _pil_pixels(ImageOps.exif_transpose(image))
    except (RuntimeError, OSError, SyntaxError, ValueError) as error:  # damage surfaces while decoding
        raise UserError(f"{path}: image data is corrupt or truncated ({_reason(error)})") from None
    if pixels.dtype != torch.uint8:  # 16-bit PNGs and TIFFs
        pixels = F.to_dtype(pixels, torch.uint8, scale=True)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return _on_white(pixels) if pixels.shape[0] == 4 else pixels


def fit_image(rgb: torch.Tensor, channels: int | Literal["auto"], size: tuple[int, int]) -> torch.Tensor:
    """uint8 3×H×W RGB → `channels`×`size`. A grey image is resized as one channel, its luma, so its pixels are
    the same whether the model takes 1 or 3 channels, or "auto" chose either."""
    if channels == 1 or is_grey(rgb):
        small = _resize(_luma(rgb), size)
        return small.expand(3, -1, -1).contiguous() if channels == 3 else small
    return _resize(rgb, size)


def is_grey(rgb: torch.Tensor) -> bool:
    """True when no pixel's red, green and blue differ by more than GREY_TOLERANCE: a grey photo saved as RGB
    is grey too."""
    return bool((rgb.amax(0) - rgb.amin(0)).max() <= GREY_TOLERANCE)


def _pil_pixels(image: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 (RGB or RGBA) or uint16 (grey) C×H×W tensor."""
    if image.mode in _PIL_16_BIT:
        grey = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return torch.from_numpy(grey)[None]
    if image.has_transparency_data:  # RGBA, LA, PA, or a palette or colour marked transparent
        return F.pil_to_tensor(image.convert("RGBA"))
    return F.pil_to_tensor(image.convert("RGB"))  # also CMYK, palette, 1-bit


def _on_white(rgba: torch.Tensor) -> torch.Tensor:
    """Composite RGBA onto white, as image viewers do: the colour under a transparent pixel is often garbage
    (or black), which dropping alpha would show the model."""
    alpha = rgba[3:].int()
    if bool((alpha == 255).all()):
        return rgba[:3]
    blended = (rgba[:3].int() * alpha + 255 * (255 - alpha) + 127) // 255
    return blended.to(torch.uint8)


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (PIL's "L") in integers, rounded: torchvision's float version turns white into 254."""
    r, g, b = rgb.int()
    return ((r * 299 + g * 587 + b * 114 + 500) // 1000).to(torch.uint8)[None]


def _resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.resize(pixels, list(size), antialias=True).contiguous()


def _checked_format(path: Path) -> str:
    """The file's format from its header, after checking its pixel count: the header is read, not the image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below is stricter
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise Image.DecompressionBombError
                return image.format or ""
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image file PIL can read") from None
    except Image.DecompressionBombError:
        raise UserError(
            f"{path}: image is too large (over {MAX_PIXELS:,} pixels); refusing to decode it"
        ) from None
    except (OSError, SyntaxError) as error:
        raise UserError(f"{path}: image data is corrupt or truncated ({_reason(error)})") from None


def _reason(error: BaseException) -> str:
    """A decoder's message without the C++ source location torchvision puts in front of it."""
    text = re.sub(r"^.*?\.cpp:\d+, ", "", " ".join(str(error).split()))
    return text[:160] or type(error).__name__
