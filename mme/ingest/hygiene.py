"""Per-item hygiene for real image–caption data.

Every check either returns a clean value or raises :class:`Skip` with a short, machine-stable
reason code (one of :data:`REASONS`) and a human detail, so ``prepare`` can count skips per reason
in the manifest and, in strict mode, stop at the first one.

Images: the declared size is checked before any pixel is decoded (decompression bombs), then the
image is fully decoded (truncated / corrupt files), EXIF orientation is applied and the pixels
are converted to 8-bit RGB. The original bytes are kept when they already are a plain RGB JPEG or
PNG that needed no change; anything else is re-encoded as lossless, deterministic PNG.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from mme import fsio, limits
from mme.shards import encode_png, sha256_bytes

REASONS = (
    "missing_file",  # the image file / member does not exist
    "unreadable_file",  # it exists but cannot be read (permissions, I/O error)
    "not_regular_file",  # a link leaving the input root, a FIFO, device or folder
    "outside_root",  # a path the data names outside the input root (CSV: ../x, /abs/x)
    "too_large",  # the file / member (or its caption file) is over its byte cap (mme.limits)
    "invalid_name",  # the file name / CSV image cell is not valid UTF-8
    "unreadable_image",  # not an image of an allowed format, or corrupt
    "truncated_image",  # the image data ends early
    "decompression_bomb",  # declared width * height > max_pixels
    "too_small",  # short side < min_side
    "unsupported_mode",  # pixel format we do not convert (float, 32-bit int range, ...)
    "duplicate_image",  # same source bytes as an earlier item
    "no_valid_captions",  # every caption was dropped (raised by the caller)
    "invalid_utf8",  # caption drop reason
    "empty_caption",  # caption drop reason
    "caption_too_long",  # caption drop reason: over mme.limits.MAX_CAPTION_CHARS
)

# Only decoders for formats that image-caption corpora actually use: Pillow's rarer plugins
# (EPS calls Ghostscript, for one) are attack surface we do not need on scraped bytes.
# (The JPEG opener also returns camera MPO files, which embed a second, preview image.)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_TO_RGB = {"L", "P", "1", "CMYK", "RGBX", "YCbCr"}  # Pillow's own conversion is exact for these
_WITH_ALPHA = {"RGBA", "LA", "PA"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_UTF8_BOM = b"\xef\xbb\xbf"


class Skip(Exception):
    """An item (or caption) that is left out, with a stable ``reason`` code and a ``detail``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)  # both in args, so a Skip survives pickling
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass(frozen=True)
class CleanImage:
    image_bytes: bytes
    ext: str  # "jpg" or "png"
    width: int
    height: int
    converted_from: str | None  # the original mode if pixels were converted to RGB, else None


def load_bytes(load: Callable[[], bytes], source: str) -> bytes:
    """Call a ``RawItem.load``, turning file errors into ``Skip``."""
    try:
        return load()
    except fsio.OutsideRoot as err:
        raise Skip("outside_root", f"{source}: {err.strerror}") from None
    except fsio.NotRegularFile as err:
        raise Skip("not_regular_file", f"{source}: {err.strerror}") from None
    except fsio.TooLarge as err:
        raise Skip("too_large", f"{source}: {err.strerror}") from None
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        raise Skip("missing_file", f"{source}: {err}") from None
    except OSError as err:
        raise Skip("unreadable_file", f"{source}: {err}") from None


# ------------------------------------------------------------------------------------ images


def clean_image(
    data: bytes, *, min_side: int, max_pixels: int, max_side: int | None = None
) -> CleanImage:
    """Validate and normalise one image; see the module docstring. Raises ``Skip``."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Something in the process switched Pillow to padding truncated images with grey: our
        # truncation check would silently pass broken images, so refuse rather than guess.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; mme needs it False")
    with _open(data) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise Skip("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
        if min(w, h) < min_side:
            raise Skip("too_small", f"{w}x{h}: short side < min_side={min_side}")
        _decode(im)
        rotated = _orientation(im) in range(2, 9)
        oriented = _exif_transpose(im) if rotated else im
        rgb, converted_from = _to_rgb(oriented)
        resized = max_side is not None and min(w, h) > max_side
        if resized:
            rgb = _resize_short_side(rgb, max_side)
        ext = None if rotated or resized or converted_from else _original_ext(im, data)
    if ext is not None:
        return CleanImage(data, ext, w, h, None)
    return CleanImage(encode_png(np.asarray(rgb)), "png", rgb.width, rgb.height, converted_from)


def _open(data: bytes) -> Image.Image:
    """Open (header only, no pixels decoded yet) or raise ``Skip``."""
    try:
        # Our own max_pixels check replaces Pillow's warning; Pillow's hard limit (twice its
        # MAX_IMAGE_PIXELS) still raises DecompressionBombError, which we report the same way.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as err:
        raise Skip("decompression_bomb", str(err)) from None
    except MemoryError:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        if not data:
            detail = "empty file"
        elif isinstance(err, UnidentifiedImageError):
            detail = f"not a {'/'.join(ALLOWED_FORMATS)} image"
        else:
            detail = _describe(err)
        raise Skip("unreadable_image", detail) from None


def _decode(im: Image.Image) -> None:
    """Decode all pixels now, so truncated or corrupt data is caught here and not in training."""
    try:
        im.load()
    except MemoryError:
        raise
    except Exception as err:  # same zoo of exception types as in _open
        truncated = isinstance(err, EOFError) or "truncated" in str(err).lower()
        raise Skip("truncated_image" if truncated else "unreadable_image", _describe(err)) from None


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # malformed EXIF: keep the readable image, as if it had no orientation tag
        return 1


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception as err:
        raise Skip("unreadable_image", f"cannot apply EXIF orientation: {_describe(err)}") from None


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB pixels and the original mode (None when the image already was plain RGB).

    Multi-frame files (animated GIF/WebP, MPO, multi-page TIFF) give their first frame, as every
    CLIP data loader does; their original bytes are never kept, so the shard holds that frame only.
    """
    mode = im.mode
    has_key = "transparency" in im.info  # palette alpha, or a tRNS colour key on L / RGB
    if mode == "RGB" and not has_key:
        return im, None
    if mode in _WITH_ALPHA or (has_key and mode in {"P", "L", "RGB"}):
        return _on_white(im.convert("RGBA")), mode
    if mode in _TO_RGB:
        return im.convert("RGB"), mode
    if mode in _SIXTEEN_BIT:
        return _sixteen_bit_to_rgb(im), mode
    raise Skip("unsupported_mode", f"mode {mode!r} is not converted to RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    # Transparent pixels hold arbitrary colours (often black or leftovers) that only the alpha
    # hides; dropping alpha would expose them. White is what web pages, where most transparent
    # images (logos, product shots) come from, show behind them, so captions describe that look.
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_bit_to_rgb(im: Image.Image) -> Image.Image:
    """Scale 0..65535 to 0..255 (rounded); Pillow's own convert would clip at 255 instead.

    Mode ``I`` (32-bit int) is how some decoders deliver 16-bit grey; values outside 0..65535
    mean it is not, and there is no right scaling to guess.
    """
    values = np.asarray(im).astype(np.int64)  # also normalises big-endian I;16B
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise Skip("unsupported_mode", f"mode {im.mode!r} with values outside 0..65535")
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")


def _resize_short_side(im: Image.Image, short: int) -> Image.Image:
    w, h = im.size
    scale = short / min(w, h)
    size = (short, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), short)
    return im.resize(size, Image.Resampling.LANCZOS)


def _original_ext(im: Image.Image, data: bytes) -> str | None:
    """ "jpg"/"png" when the source bytes can go into a shard unchanged, else None."""
    if getattr(im, "n_frames", 1) != 1:
        return None
    if im.format == "JPEG":
        return "jpg"
    # IHDR bit depth 8, colour type 2 (truecolour): Pillow also opens 16-bit PNGs as mode RGB,
    # but other readers would then see 16-bit data, so those are re-encoded.
    if im.format == "PNG" and data[12:16] == b"IHDR" and data[24:26] == b"\x08\x02":
        return "png"
    return None


# ---------------------------------------------------------------------------------- captions


def clean_captions(raw: Sequence[bytes]) -> tuple[list[str], list[tuple[str, str]]]:
    """Kept captions, and ``(reason, detail)`` for each dropped one. Raises nothing.

    Whitespace runs (newlines, tabs, non-breaking spaces, ...) become one space and the ends are
    stripped; nothing else is changed. Duplicate captions of one image are kept: real datasets
    have them, and dropping them would change the caption sampling of training.
    """
    kept: list[str] = []
    dropped: list[tuple[str, str]] = []
    for i, caption in enumerate(raw):
        if caption.startswith(_UTF8_BOM):
            caption = caption[len(_UTF8_BOM) :]
        try:
            text = caption.decode("utf-8")
        except UnicodeDecodeError as err:
            detail = f"caption {i}: {err.reason} at byte {err.start}: {caption[:60]!r}"
            dropped.append(("invalid_utf8", detail))
            continue
        text = " ".join(text.split())
        if not text:
            dropped.append(("empty_caption", f"caption {i}"))
            continue
        if len(text) > limits.MAX_CAPTION_CHARS:
            detail = f"caption {i}: {len(text)} characters > {limits.MAX_CAPTION_CHARS}"
            dropped.append(("caption_too_long", detail))
            continue
        kept.append(text)
    return kept, dropped


# -------------------------------------------------------------------------------- duplicates


class DuplicateFilter:
    """Exact duplicate images, by sha256 of the source bytes.

    Source bytes rather than decoded pixels: hashing them is cheap, needs no decode and is exact.
    Re-encoded copies of one picture are not caught; that is near-duplicate detection, a different
    (and fuzzier) job than keeping the very same file from landing in a dataset twice.
    """

    def __init__(self) -> None:
        self._first: dict[str, str] = {}  # sha256 -> id of the first item with it

    def check(self, item_id: str, data: bytes) -> str:
        """Return the sha256 of ``data``; raise ``Skip("duplicate_image")`` if seen before."""
        digest = sha256_bytes(data)
        first = self._first.setdefault(digest, item_id)
        if first != item_id:
            raise Skip("duplicate_image", f"same bytes as {first}")
        return digest

    def __len__(self) -> int:
        return len(self._first)
