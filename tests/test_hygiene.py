"""Image and caption hygiene: every image is built here with PIL, never read from the repo."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from mme.ingest.hygiene import (
    REASONS,
    DuplicateFilter,
    Skip,
    clean_captions,
    clean_image,
    load_bytes,
)
from mme.shards import sha256_bytes

LIMITS = {"min_side": 16, "max_pixels": 1_000_000}


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def pixels(clean) -> np.ndarray:
    with Image.open(io.BytesIO(clean.image_bytes)) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what Pillow cannot write (16-bit RGB, lying headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def skip_reason(data: bytes, **kw) -> str:
    with pytest.raises(Skip) as info:
        clean_image(data, **{**LIMITS, **kw})
    assert info.value.reason in REASONS
    return info.value.reason


# ----------------------------------------------------------------------------------- modes


def palette_image(transparent: bool) -> tuple[bytes, dict]:
    im = Image.new("P", (20, 20), 0)
    im.putpalette([0, 0, 0, 200, 30, 40] + [0] * (254 * 3))
    im.paste(1, (10, 0, 20, 20))  # right half: index 1
    if transparent:  # index 0 transparent: left half shows the white background
        return encode(im, "PNG", transparency=0), {(2, 2): (255, 255, 255), (15, 2): (200, 30, 40)}
    return encode(im, "PNG"), {(2, 2): (0, 0, 0), (15, 2): (200, 30, 40)}


def alpha_image(mode: str) -> tuple[bytes, dict]:
    if mode == "RGBA":
        im = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # black but fully transparent
        im.paste((255, 0, 0, 255), (10, 0, 20, 20))
        return encode(im, "PNG"), {(2, 2): (255, 255, 255), (15, 2): (255, 0, 0)}
    im = Image.new("LA", (20, 20), (0, 0))
    im.paste((50, 255), (10, 0, 20, 20))
    return encode(im, "PNG"), {(2, 2): (255, 255, 255), (15, 2): (50, 50, 50)}


def sixteen_bit_image() -> tuple[bytes, dict]:
    grey = np.zeros((20, 20), np.uint16)
    grey[:, 5:10], grey[:, 10:] = 32768, 65535
    im = Image.fromarray(grey)
    assert im.mode == "I;16"
    return encode(im, "PNG"), {(2, 2): (0, 0, 0), (7, 2): (128,) * 3, (15, 2): (255,) * 3}


def one_bit_image() -> tuple[bytes, dict]:
    im = Image.new("1", (20, 20), 0)
    im.paste(1, (10, 0, 20, 20))
    return encode(im, "PNG"), {(2, 2): (0, 0, 0), (15, 2): (255, 255, 255)}


MODE_CASES = {
    "L": lambda: (encode(Image.new("L", (20, 20), 100), "PNG"), {(3, 3): (100, 100, 100)}),
    "P": lambda: palette_image(transparent=False),
    "P+transparency": lambda: palette_image(transparent=True),
    "RGBA": lambda: alpha_image("RGBA"),
    "LA": lambda: alpha_image("LA"),
    # TIFF keeps CMYK lossless; naive CMYK -> RGB is 255 - channel
    "CMYK": lambda: (
        encode(Image.new("CMYK", (20, 20), (255, 0, 0, 0)), "TIFF"),
        {(3, 3): (0, 255, 255)},
    ),
    "I;16": sixteen_bit_image,
    "1": one_bit_image,
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_mode_converts_to_rgb(case):
    data, expected = MODE_CASES[case]()
    clean = clean_image(data, **LIMITS)
    assert clean.ext == "png"
    assert clean.converted_from == case.split("+")[0]
    assert (clean.width, clean.height) == (20, 20)
    got = pixels(clean)
    for (x, y), rgb in expected.items():
        assert tuple(got[y, x]) == rgb, (x, y)
    assert clean_image(data, **LIMITS).image_bytes == clean.image_bytes  # deterministic


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Image.fromarray(np.full((20, 20), 0.5, np.float32)), id="F"),
        pytest.param(lambda: Image.fromarray(np.full((20, 20), 100_000, np.int32)), id="I-32bit"),
    ],
)
def test_unsupported_modes(make):
    assert skip_reason(encode(make(), "TIFF")) == "unsupported_mode"


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    clean = clean_image(buf.getvalue(), **LIMITS)
    assert clean.ext == "png"
    assert tuple(pixels(clean)[5, 5]) == (255, 0, 0)


# ----------------------------------------------------------------------- broken and hostile


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(fmt):
    data = encode(noise(64, 64), fmt)
    assert skip_reason(data[: len(data) // 2]) == "truncated_image"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(np.random.default_rng(0).bytes(5000), id="garbage"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, id="png-signature-only"),
        pytest.param(encode(noise(20, 20), "PPM"), id="format-not-allowed"),
    ],
)
def test_unreadable_image(data):
    assert skip_reason(data) == "unreadable_image"


@pytest.mark.parametrize(
    "side, max_pixels",
    [
        pytest.param(5000, 1_000_000, id="over-max_pixels"),
        pytest.param(30_000, 10**12, id="over-pillow-hard-limit"),
    ],
)
def test_decompression_bomb_checked_before_decoding(side, max_pixels):
    # A huge declared canvas with almost no data: decoding it would fail as truncated (or eat
    # the memory), so getting decompression_bomb shows the header check comes first.
    data = raw_png(side, side, 8, 2, b"\x00" * 10)
    assert skip_reason(data, max_pixels=max_pixels) == "decompression_bomb"


def test_truncation_check_requires_pillow_default(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        clean_image(encode(noise(20, 20), "PNG"), **LIMITS)


@pytest.mark.parametrize("size, ok", [((15, 40), False), ((40, 15), False), ((16, 16), True)])
def test_min_side(size, ok):
    data = encode(noise(*size), "PNG")
    if ok:
        assert clean_image(data, **LIMITS).image_bytes == data
    else:
        assert skip_reason(data) == "too_small"


# ------------------------------------------------------------------------ resize and bytes


@pytest.mark.parametrize(
    "size, max_side, expected",
    [((200, 100), 50, (100, 50)), ((199, 301), 50, (50, 76)), ((64, 64), 32, (32, 32))],
)
def test_resize_short_side_keeps_aspect(size, max_side, expected):
    data = encode(noise(*size), "JPEG")
    clean = clean_image(data, **LIMITS, max_side=max_side)
    assert (clean.width, clean.height) == expected
    assert clean.ext == "png" and clean.converted_from is None
    assert pixels(clean).shape == (expected[1], expected[0], 3)
    assert clean_image(data, **LIMITS, max_side=max_side).image_bytes == clean.image_bytes


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png")])
@pytest.mark.parametrize("max_side", [None, 64, 100])
def test_plain_rgb_keeps_original_bytes(fmt, ext, max_side):
    data = encode(noise(100, 64), fmt)
    clean = clean_image(data, **LIMITS, max_side=max_side)
    assert clean.image_bytes == data
    assert (clean.ext, clean.width, clean.height, clean.converted_from) == (ext, 100, 64, None)


def test_16bit_rgb_png_is_reencoded_as_8bit():
    rgb16 = np.full((20, 20, 3), 65535, ">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb16)  # filter byte 0 per row
    data = raw_png(20, 20, 16, 2, rows)
    clean = clean_image(data, **LIMITS)
    assert clean.ext == "png" and clean.image_bytes != data
    assert data[24] == 16 and clean.image_bytes[24] == 8
    assert pixels(clean).min() == 255


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP"])
def test_other_rgb_formats_become_png(fmt):
    clean = clean_image(
        encode(noise(20, 20), fmt, **({"lossless": True} if fmt == "WEBP" else {})), **LIMITS
    )
    assert clean.ext == ("jpg" if fmt == "JPEG" else "png")


def exif_jpeg(orientation: int) -> bytes:
    # Stored 40 wide x 20 high: left half red, right half blue.
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif, quality=95)


def test_exif_rotated_jpeg_comes_out_upright():
    # Orientation 6: the viewer rotates 90 degrees clockwise, so the left (red) half is on top.
    clean = clean_image(exif_jpeg(6), **LIMITS)
    assert (clean.width, clean.height, clean.ext) == (20, 40, "png")
    got = pixels(clean).astype(int)
    top, bottom = got[5, 10], got[35, 10]
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_exif_orientation_1_keeps_original():
    data = exif_jpeg(1)
    clean = clean_image(data, **LIMITS)
    assert clean.image_bytes == data and (clean.width, clean.height) == (40, 20)


# -------------------------------------------------------------------------------- captions


def test_clean_captions():
    raw = [
        b"a dog  on\tthe\n grass ",
        b"\xff\xfe not utf-8",
        b"",
        b" \t\r\n ",
        b"\xef\xbb\xbfwith a BOM",
        "caf\u00e9\u00a0au lait".encode(),  # non-breaking space is whitespace too
        b"a dog on the grass",  # duplicates are kept
    ]
    kept, dropped = clean_captions(raw)
    assert kept == [
        "a dog on the grass",
        "with a BOM",
        "caf\u00e9 au lait",
        "a dog on the grass",
    ]
    assert [reason for reason, _ in dropped] == ["invalid_utf8", "empty_caption", "empty_caption"]
    assert dropped[0][1].startswith("caption 1:")
    assert all(r in REASONS for r, _ in dropped)


@pytest.mark.parametrize("raw", [[], [b""], [b"\xef\xbb\xbf   "], [b"\xc3\x28"]])
def test_clean_captions_nothing_left(raw):
    kept, dropped = clean_captions(raw)
    assert kept == [] and len(dropped) == len(raw)


# ------------------------------------------------------------------ duplicates and loading


def test_duplicate_filter():
    dup = DuplicateFilter()
    a, b = encode(noise(20, 20, seed=1), "PNG"), encode(noise(20, 20, seed=2), "PNG")
    assert dup.check("a", a) == sha256_bytes(a)
    assert dup.check("b", b) == sha256_bytes(b)
    with pytest.raises(Skip) as info:
        dup.check("c", a)
    assert info.value.reason == "duplicate_image"
    assert info.value.detail == "same bytes as a"
    assert len(dup) == 2


def test_skip_is_readable_and_picklable():
    skip = Skip("too_small", "10x10")
    assert str(skip) == "too_small: 10x10"
    again = pickle.loads(pickle.dumps(skip))
    assert (again.reason, again.detail) == ("too_small", "10x10")


def _raise(err: Exception):
    def load() -> bytes:
        raise err

    return load


@pytest.mark.parametrize(
    "err, reason",
    [
        (FileNotFoundError(2, "nope"), "missing_file"),
        (PermissionError(13, "no"), "unreadable_file"),
    ],
)
def test_load_bytes(err, reason):
    with pytest.raises(Skip) as info:
        load_bytes(_raise(err), "x.jpg")
    assert info.value.reason == reason and "x.jpg" in info.value.detail
    assert load_bytes(lambda: b"ok", "x.jpg") == b"ok"
