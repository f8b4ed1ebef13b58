"""Picture grid for humans: what the protection does to a few images and captions.

One row per sample, three image columns — clean | noise, amplified | protected — and the
protected caption to the right. The noise column maps δ = protected − clean from [−ε, ε] to
[0, 255] (mid-grey = no change), so an 8/255 pattern that is invisible in the protected image is
plainly visible. Images are upscaled with NEAREST so single pixels of a 64-px image stay sharp.
Only PIL's built-in font is used (ASCII text), so the output is the same on every machine with
the same Pillow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mme import fsio

PAD = 8  # pixels between cells
FONT_SIZE = 14
TEXT_WIDTH = 360  # caption column width in pixels
MAX_LINES = 8  # caption lines per row; longer captions end in "..."
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def amplify_noise(clean: np.ndarray, protected: np.ndarray, epsilon: float) -> np.ndarray:
    """δ = protected − clean mapped linearly from [−ε, ε] to [0, 255] uint8 (same shape).

    ε ≤ 0 gives uniform mid-grey; values beyond ±ε (a broken set) saturate at 0 / 255.
    """
    delta = protected.astype(np.float64) - clean.astype(np.float64)
    if epsilon <= 0:
        return np.full(delta.shape, 128, np.uint8)
    return np.clip(np.rint((delta + epsilon) / (2 * epsilon) * 255), 0, 255).astype(np.uint8)


def wrap_text(
    text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int = MAX_LINES
) -> list[str]:
    """Greedy word wrap to ``width`` pixels; over-long words are cut; past ``max_lines`` the
    last line ends in "..."."""
    pieces = [p for word in text.split() for p in _split_long(word, font, width)]
    lines: list[str] = []
    for piece in pieces:
        candidate = f"{lines[-1]} {piece}" if lines else piece
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(piece)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + " ...") > width:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last + " ..."]
    return lines


def _split_long(word: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """A word wider than the column, cut into pieces that fit (at least one character each)."""
    parts = []
    while len(word) > 1 and font.getlength(word) > width:
        cut = len(word) - 1
        while cut > 1 and font.getlength(word[:cut]) > width:
            cut -= 1
        parts.append(word[:cut])
        word = word[cut:]
    return [*parts, word]


def _to_hwc(image: np.ndarray, scale: int) -> Image.Image:
    """(3, S, S) uint8 -> PIL image upscaled ``scale``× with NEAREST (crisp pixels)."""
    im = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.uint8), "RGB")
    return im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)


def _font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _check_inputs(clean: np.ndarray, protected: np.ndarray, captions: list[str]) -> None:
    if clean.shape != protected.shape or clean.ndim != 4 or clean.shape[1] != 3:
        raise ValueError(f"need two (n, 3, S, S) arrays, got {clean.shape} and {protected.shape}")
    if clean.dtype != np.uint8 or protected.dtype != np.uint8:
        raise ValueError(f"need uint8 images, got {clean.dtype} and {protected.dtype}")
    if len(captions) != len(clean):
        raise ValueError(f"{len(captions)} captions for {len(clean)} images")


def make_grid(
    clean: np.ndarray,
    protected: np.ndarray,
    captions: list[str],
    epsilon: float,
    scale: int = 3,
    title: str | None = None,
) -> Image.Image:
    """RGB grid: one row per sample — clean | amplified noise | protected | caption.

    ``clean`` / ``protected``: (n, 3, S, S) uint8; ``captions``: one protected caption per row;
    ``epsilon`` in 0–255 units sets the noise amplification; ``scale`` upscales each image
    (NEAREST). The title line is ``title`` (default: ε) and says how the noise is shown.
    Deterministic: the same inputs give the same pixels. Text is drawn with PIL's default font,
    which has no Greek letters: write "eps", not "ε".
    """
    _check_inputs(clean, protected, captions)
    font, line_h = _font(), FONT_SIZE + 4
    cell = clean.shape[-1] * scale
    cols = [PAD + k * (cell + PAD) for k in range(4)]  # x of the 3 image columns + caption
    wrapped = [wrap_text(c, font, TEXT_WIDTH) for c in captions]
    rows_h = [max(cell, len(lines) * line_h) for lines in wrapped]
    top = PAD + 2 * line_h + PAD // 2  # title line + column labels
    size = (cols[3] + TEXT_WIDTH + PAD, top + sum(h + PAD for h in rows_h))
    grid = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(grid)
    heading = title or f"eps = {epsilon:g}/255 (L-inf)"
    heading += f";  noise column maps [-{epsilon:g}, {epsilon:g}] to [0, 255]"
    draw.text((PAD, PAD), heading, font=font, fill=INK)
    labels = ("clean", "noise (amplified)", "protected", "protected caption")
    for x, label in zip(cols, labels, strict=True):
        draw.text((x, PAD + line_h + PAD // 4), label, font=font, fill=INK)
    y = top
    for i, lines in enumerate(wrapped):
        noise = amplify_noise(clean[i], protected[i], epsilon)
        for x, image in zip(cols, (clean[i], noise, protected[i]), strict=False):
            grid.paste(_to_hwc(image, scale), (x, y))
        for j, line in enumerate(lines):
            draw.text((cols[3], y + j * line_h), line, font=font, fill=INK)
        y += rows_h[i] + PAD
    return grid


def save_grid(
    path: Path,
    clean: np.ndarray,
    protected: np.ndarray,
    captions: list[str],
    epsilon: float,
    scale: int = 3,
    title: str | None = None,
) -> Path:
    """:func:`make_grid` written to ``path`` as PNG, atomically (temporary name, then rename)."""
    path = Path(path)
    with fsio.atomic_open(path) as f:
        make_grid(clean, protected, captions, epsilon, scale, title).save(f, format="PNG")
    return path


def before_after(
    rows: list[tuple[np.ndarray, np.ndarray]], epsilon: float, crop: int | None = None
) -> Image.Image:
    """One row per photo at its own size (no resampling): original | protected | difference
    amplified from [−ε, ε] to [0, 255] (mid-grey: no change). ``rows``: ``(clean, published)``
    pairs of ``(H, W, 3)`` uint8; ``crop``: show only the central ``crop × crop`` pixels."""
    if not rows:
        raise ValueError("no photos to show")
    font, line_h = _font(), FONT_SIZE + 4
    cells = []
    for clean, published in rows:
        if crop is not None:
            h, w = clean.shape[:2]
            top, left = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
            clean = clean[top : top + crop, left : left + crop]
            published = published[top : top + crop, left : left + crop]
        diff = amplify_noise(clean, published, epsilon)
        cells.append(
            [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in (clean, published, diff)]
        )
    width = max(PAD + sum(im.width + PAD for im in row) for row in cells)
    top = PAD + line_h + PAD // 2
    size = (width, top + sum(row[0].height + PAD for row in cells))
    picture = Image.new("RGB", size, BACKGROUND)
    title = f"original | protected | difference x{255 / (2 * epsilon):.0f} (grey: no change)"
    ImageDraw.Draw(picture).text((PAD, PAD), title, font=font, fill=INK)
    y = top
    for row in cells:
        x = PAD
        for im in row:
            picture.paste(im, (x, y))
            x += im.width + PAD
        y += row[0].height + PAD
    return picture


def save_before_after(
    path: Path, rows: list[tuple[np.ndarray, np.ndarray]], epsilon: float, crop: int | None = None
) -> Path:
    """:func:`before_after` written to ``path`` as PNG, atomically."""
    path = Path(path)
    with fsio.atomic_open(path) as f:
        before_after(rows, epsilon, crop).save(f, format="PNG")
    return path
