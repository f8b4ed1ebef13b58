"""``mme protect --dry-run``: the plan, a time estimate and the disk needed; nothing is written.

The time estimate times one forward + backward pass of the surrogate here (image and text
towers, a batch of up to 8 at the working size, on the device the run would use) and multiplies by
the number of such per-image passes the schedule makes. It is an order of magnitude, not a
promise: data loading, HotFlip's candidate scoring and writing are counted roughly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mme.app.settings import ProtectConfig, data_config, input_kind, poison_config
from mme.config import PoisonConfig

PNG_BYTES_PER_PIXEL = 3.0  # noisy photos barely compress: assume raw RGB size per PNG


class ProtectPlan(BaseModel):
    """What ``mme protect`` would do, its time estimate and disk need (``--dry-run``)."""

    input: Path
    kind: str
    images: int
    output: Path
    private: Path
    model: str
    working_size: int
    device: str
    passes: int
    seconds_per_pass: float
    estimate_seconds: float
    disk_bytes: int
    settings: dict[str, Any]

    def text(self) -> str:
        s = self.settings
        return "\n".join(
            [
                f"mme protect --dry-run: {self.input} ({self.kind}, {self.images} images)",
                "  1 prepare  -> clean shards in the private area",
                f"  2 poison   {s['method']}: surrogate {self.model} at {self.working_size} px, "
                f"eps {s['epsilon']:g}/255, {s['rounds']} rounds x {s['surrogate_steps']} "
                f"surrogate steps, {s['pgd_steps']} PGD steps, trigger {s['trigger_len']} words",
                "  3 verify   every protected image against its original",
                f"  4 export   -> {self.output}/ (publish this)",
                f"  private    {self.private}/ (never publish)",
                f"  time       ~{_duration(self.estimate_seconds)} on {self.device} "
                f"({self.passes} image passes x {self.seconds_per_pass * 1000:.0f} ms, timed here)",
                f"  disk       ~{_size(self.disk_bytes)} (input copy, work files, outputs)",
            ]
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def count_images(cfg: ProtectConfig) -> tuple[int, int]:
    """(images, input bytes) without decoding anything."""
    from mme.ingest import sources

    dcfg = data_config(cfg)
    if dcfg.source == "csv":
        items = list(
            sources.iter_csv(
                dcfg.csv,
                image_column=dcfg.image_column,
                caption_column=dcfg.caption_column,
                delimiter=dcfg.delimiter,
            )
        )
        paths = [Path(dcfg.csv).parent / i.source for i in items]
        return len(items), sum(_file_bytes(p) for p in paths)
    if dcfg.source == "folder":
        items = list(sources.iter_folder(dcfg.input))
        return len(items), sum(_file_bytes(Path(i.source)) for i in items)
    if dcfg.source == "hf":
        cols = dict(image_column=dcfg.image_column, caption_column=dcfg.caption_column)
        n = sum(1 for _ in sources.iter_hf(dcfg.input, **cols))
        files = [dcfg.input] if Path(dcfg.input).is_file() else Path(dcfg.input).rglob("*")
        return n, sum(Path(f).stat().st_size for f in files if Path(f).is_file())
    tars = [dcfg.input] if Path(dcfg.input).is_file() else sorted(Path(dcfg.input).glob("*.tar"))
    n = sum(1 for _ in sources.iter_webdataset(dcfg.input))
    return n, sum(t.stat().st_size for t in tars)


def _file_bytes(path: Path) -> int:
    """Bytes of ``path``; 0 for what prepare will skip (gone, a FIFO, a name that is not UTF-8
    and so printed escaped in ``source``)."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def passes(pcfg: PoisonConfig, n: int) -> int:
    """Per-image forward+backward passes of the schedule (PGD over every image, surrogate
    batches, and about one pass per image for each trigger round)."""
    if pcfg.method == "random":
        return 0
    per_round = pcfg.pgd_steps * n + pcfg.surrogate_steps * min(pcfg.batch_size, n)
    return pcfg.rounds * per_round + pcfg.trigger_rounds * n


def time_one_pass(pcfg: PoisonConfig) -> tuple[float, int, str]:
    """(seconds per image for forward+backward, working size, device) measured here."""
    import torch

    from mme import models

    device = models.resolve_device(pcfg.device)
    model, tokenizer = models.create_model(pcfg.model, pcfg.pretrained, device)
    size, b = models.image_size(model), 8
    x = torch.rand(b, 3, size, size, device=device, requires_grad=True)
    text = tokenizer(["a photo of a thing"] * b).to(device)
    best = float("inf")
    for _ in range(2):  # the first call pays one-off costs
        t0 = time.perf_counter()
        img = model.encode_image(models.preprocess_images(x, model))
        (img.float().sum() + model.encode_text(text).float().sum()).backward()
        best = min(best, time.perf_counter() - t0)
    return best / b, size, str(device)


def plan(cfg: ProtectConfig) -> ProtectPlan:
    kind = input_kind(cfg.input)
    pcfg = poison_config(cfg)
    n, input_bytes = count_images(cfg)
    per_pass, size, device = time_one_pass(pcfg)
    k = passes(pcfg, n)
    px = n * 3 * size * size
    # clean copy ~ input; work memmaps: clean u8 + 2 noise buffers; protected shards + export
    # (PNG ~ raw); noise.npy
    disk = input_bytes + 3 * px + int(2 * PNG_BYTES_PER_PIXEL / 3 * px) + px
    return ProtectPlan(
        input=cfg.input,
        kind=kind,
        images=n,
        output=cfg.output,
        private=cfg.private_dir,
        model=pcfg.model,
        working_size=size,
        device=device,
        passes=k,
        seconds_per_pass=per_pass,
        estimate_seconds=k * per_pass,
        disk_bytes=disk,
        settings=pcfg.model_dump(mode="json"),
    )
