"""One image file → uint8 C×H×W of a model's input shape, the same way at training time and at prediction time.

preprocess (a folder data set) and `predict` both call `read_image`, so a model never sees one resize in training
and another in use.
"""

import re
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from image_classifier.errors import UserError

# Refuse images that would decode to more than this many pixels (a decompression bomb exhausts memory).
MAX_PIXELS = 40_000_000
# What a folder data set counts as an image; anything else in the folder is skipped.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
# Formats torchvision's own decoders read; PIL decodes the rest (BMP, TIFF, ...), as predict always has.
_TORCHVISION_FORMATS = frozenset({"PNG", "JPEG", "GIF", "WEBP", "MPO"})  # MPO: JPEG from cameras


def read_image(path: Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Decode `path` as uint8 `channels`×H×W (1 grey, 3 RGB) resized to `size` = (H, W), bilinear antialiased.

    Raises UserError naming the file when it is missing, not an image, corrupt, or too large to decode safely."""
    image_format = _checked_format(path)
    try:
        if image_format in _TORCHVISION_FORMATS:
            data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
            mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
            pixels = decode_image(data, mode=mode, apply_exif_orientation=True)
        else:
            with Image.open(path) as image:
                pixels = F.pil_to_tensor(image.convert("L" if channels == 1 else "RGB"))
    except (RuntimeError, OSError, SyntaxError, ValueError) as error:  # damage surfaces while decoding
        raise UserError(f"{path}: image data is corrupt or truncated ({_reason(error)})") from None
    if pixels.ndim == 4:  # an animated GIF: its first frame
        pixels = pixels[0]
    if pixels.dtype != torch.uint8:  # 16-bit PNGs decode as uint16
        pixels = F.to_dtype(pixels, torch.uint8, scale=True)
    # The GIF and WebP decoders ignore a grey read mode, and a grey file may come back with one channel.
    if channels == 1 and pixels.shape[0] != 1:
        pixels = F.rgb_to_grayscale(pixels[:3])
    elif channels == 3 and pixels.shape[0] != 3:
        pixels = pixels[:1].expand(3, -1, -1)
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
