"""``mme protect --dry-run``: the plan, what will be skipped, a time estimate and the disk
needed; nothing is written beside a temporary probe folder, removed at once.

Every input item goes through ``prepare``'s own checks (captions, a decodable image of an
allowed format, size limits, duplicates: :func:`mme.ingest.prepare.clean_item`), so the plan
lists exactly what the run will skip, with the formats and sizes of the photos it will publish.
The time is measured by a short run of the real stages on a few of these photos
(:mod:`mme.app.probe`). Without ``--dry-run`` ``mme protect`` prints a quick version (counts and
disk, no probe) before it starts.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mme.app.settings import ProtectConfig, data_config, input_kind, poison_config, resolve_profile
from mme.config import ConfigError

PNG_BYTES_PER_PIXEL = 3.0  # noisy photos barely compress: assume raw RGB size per PNG
JPEG_GROWTH = 3.0  # a protected JPEG at q 98, 4:4:4 vs its source (2.1-2.8x measured: protect.md)
PROBE_ITEMS = 16
SHOW_SKIPS = 3  # example ids per skip reason


class Scan(BaseModel):
    """What the input holds, by ``prepare``'s checks."""

    images: int = 0
    input_bytes: int = 0
    pixels: int = 0
    skipped: dict[str, list[str]] = Field(default_factory=dict)  # reason -> example sources
    skip_counts: dict[str, int] = Field(default_factory=dict)
    formats: dict[str, int] = Field(default_factory=dict)
    smallest: tuple[int, int] | None = None
    largest: tuple[int, int] | None = None


class ProtectPlan(BaseModel):
    """What ``mme protect`` would do, its time estimate and disk need (``--dry-run``)."""

    input: Path
    kind: str
    scan: Scan
    output: Path
    private: Path
    profile: str
    format: str
    jpeg_quality: int
    model: str
    device: str
    estimate_seconds: float | None
    probe: dict[str, Any] | None
    probe_error: str | None = None  # the probe run stopped: the real run would too
    disk_bytes: int
    free_bytes: int
    settings: dict[str, Any]

    @property
    def images(self) -> int:
        return self.scan.images

    def text(self) -> str:
        lines = [f"mme protect --dry-run: {self.input} ({self.kind}, {self._photos()})"]
        lines += [f"  will skip  {line}" for line in self._skips()]
        if not self.scan.images:
            return "\n".join(lines)
        s = self.settings
        return "\n".join(
            lines
            + [
                f"  profile    {self.profile} (device {self.device}; --profile cpu|gpu to choose)",
                "  1 prepare  -> clean shards in the private area",
                f"  2 poison   {s['method']}: surrogate {self.model}, eps {s['epsilon']:g}/255, "
                f"{s['rounds']} rounds x {s['surrogate_steps']} surrogate steps, "
                f"{_inner_steps(s)}, batch {s['batch_size']}, {s['threads']} threads",
                "  3 verify   every protected image against its original",
                f"  4 publish  -> {self.output}/ (publish this): {self._publishes()}",
                f"  private    {self.private}/ (never publish)",
                f"  time       {self._time()}",
                f"  disk       ~{_size(self.disk_bytes)} (input copy, work files, outputs; "
                f"{_size(self.free_bytes)} free)",
            ]
        )

    def _photos(self) -> str:
        c = self.scan
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(c.formats.items()))
        if not c.images:
            return "no usable images"
        size = f"{c.smallest[0]}x{c.smallest[1]} to {c.largest[0]}x{c.largest[1]} px"
        return f"{c.images} images: {kinds}; {size}"

    def _skips(self) -> list[str]:
        if not self.scan.skip_counts:
            return ["nothing"]
        return [
            f"{n} {reason} (e.g. {', '.join(self.scan.skipped[reason])})"
            for reason, n in sorted(self.scan.skip_counts.items())
        ]

    def _publishes(self) -> str:
        if self.format == "native":
            return f"your photos at their own names, sizes and formats (JPEG q {self.jpeg_quality})"
        return f"the working-size set ({self.format})"

    def _time(self) -> str:
        if self.probe_error is not None:
            return f"not estimated: the probe run stopped: {self.probe_error}"
        if self.estimate_seconds is None:
            return "not estimated (--dry-run times a short probe run)"
        p = self.probe or {}
        return (
            f"~{_duration(self.estimate_seconds)} on {self.device} (a probe of {p['k']} photos "
            f"through every stage took {p['probe_s']:.0f} s here; per image: "
            f"{p['surrogate_ms']:.0f} ms a surrogate step, {p['noise_ms']:.0f} ms a noise step, "
            f"{p['per_image_s']:.2f} s the rest)"
        )


def _inner_steps(settings: dict[str, Any]) -> str:
    """The per-round optimisation of the method, for the plan: keyed has no PGD."""
    if settings["method"] == "keyed":
        return f"{settings['pattern_steps']} pattern steps"
    return f"{settings['pgd_steps']} PGD steps"


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def scan(cfg: ProtectConfig, keep: int = PROBE_ITEMS) -> tuple[Scan, list[tuple]]:
    """``prepare``'s checks on every item (nothing written); returns the scan and the first
    ``keep`` good photos as ``(extension, bytes, captions)`` for the probe."""
    from mme.ingest import hygiene
    from mme.ingest.prepare import clean_item, raw_items

    dcfg = data_config(cfg)
    out, good, dups, dropped = Scan(), [], hygiene.DuplicateFilter(), []
    skips: Counter = Counter()
    for item in raw_items(dcfg):
        try:
            sample = clean_item(item, dcfg, dups, dropped)
        except hygiene.Skip as skip:
            skips[skip.reason] += 1
            examples = out.skipped.setdefault(skip.reason, [])
            if len(examples) < SHOW_SKIPS:
                examples.append(Path(item.source).name)
            continue
        data = hygiene.load_bytes(item.load, item.source)
        _count(out, sample.meta, data)
        if len(good) < keep:
            good.append((_extension(data), data, sample.captions))
    out.skip_counts = dict(skips)
    return out, good


def _count(out: Scan, meta: dict[str, Any], data: bytes) -> None:
    from mme.app.publish import source_info

    fmt = source_info(data, keep_exif=False).format
    out.images += 1
    out.input_bytes += len(data)
    out.formats[fmt] = out.formats.get(fmt, 0) + 1
    size = (int(meta["width"]), int(meta["height"]))
    out.pixels += size[0] * size[1]
    area = size[0] * size[1]
    if out.smallest is None or area < out.smallest[0] * out.smallest[1]:
        out.smallest = size
    if out.largest is None or area > out.largest[0] * out.largest[1]:
        out.largest = size


def _extension(data: bytes) -> str:
    """The file name ending of an image that passed prepare's checks (the probe's copy)."""
    from mme.app.publish import EXTENSIONS, FORMATS, source_info

    fmt = source_info(data, keep_exif=False).format
    return EXTENSIONS[FORMATS.get(fmt, "PNG")]


def disk_need(c: Scan, working_size: int) -> int:
    """Input copy + work memmaps (clean + 2 noise buffers) + working-size shards + noise.npy +
    the published photos (JPEG ~2.5x its source, the rest raw RGB size)."""
    px = c.images * 3 * working_size * working_size
    jpeg_share = c.formats.get("JPEG", 0) / c.images if c.images else 0.0
    published = jpeg_share * JPEG_GROWTH * c.input_bytes + (1 - jpeg_share) * 3 * c.pixels
    return int(c.input_bytes + 3 * px + PNG_BYTES_PER_PIXEL / 3 * px + px + published)


def plan(cfg: ProtectConfig, probe: bool = True) -> ProtectPlan:
    """The plan of ``cfg`` (``probe``: time a short run of the stages here)."""
    from mme import models
    from mme.app import probe as probing

    pcfg = poison_config(cfg)
    found, good = scan(cfg)
    timings, error = None, None
    if probe and good:
        try:
            timings = probing.run_probe(cfg, good, found.images)
        except ConfigError as err:  # e.g. too few photos for the method: the run would stop
            error = str(err)
    free_at = next(p for p in (cfg.private_dir, *cfg.private_dir.parents) if p.exists())
    return ProtectPlan(
        input=cfg.input,
        kind=input_kind(cfg.input),
        scan=found,
        output=cfg.output,
        private=cfg.private_dir,
        profile=resolve_profile(cfg),
        format=cfg.format,
        jpeg_quality=cfg.jpeg_quality,
        model=pcfg.model,
        device=str(models.resolve_device(pcfg.device)),
        estimate_seconds=probing.estimate(timings, pcfg, found.images) if timings else None,
        probe=probing.summary(timings) if timings else None,
        probe_error=error,
        disk_bytes=disk_need(found, models.config_image_size(pcfg.model)),
        free_bytes=shutil.disk_usage(free_at).free,
        settings=pcfg.model_dump(mode="json"),
    )
