"""What `mme protect` publishes (mme/app/publish.py) and how it is planned: formats, names,
EXIF, the native-size check of lossy files, the device profiles, the probe's arithmetic, the
flags and the Python signature. Pure functions first, then one tiny run."""

from __future__ import annotations

import dataclasses
import inspect
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import ExifTags, Image

from mme import cli
from mme.app import probe, publish
from mme.app.protect import ProtectConfig, protect
from mme.app.settings import poison_config, resolve_profile
from mme.config import PROTECT_PROFILES, PoisonConfig
from mme.protection import grid, native

TINY_POISON = dict(
    model="mme-tiny-vit", rounds=1, surrogate_steps=1, pgd_steps=1, step_size=8,
    trigger_rounds=1, candidates=2, batch_size=8, device="cpu", grid_samples=2, threads=1,
)  # fmt: skip


def pixels(w: int = 40, h: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def saved(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_with_gps(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make] = "PhoneCo"
    exif[ExifTags.Base.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "N"}
    return exif.tobytes()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "BMP"])
def test_lossless_formats_keep_every_pixel(fmt):
    src = saved(pixels(), fmt)
    info = publish.source_info(src, keep_exif=False)
    assert info.format == fmt
    out = publish.encode(pixels(seed=1), info, 97)
    with Image.open(io.BytesIO(out)) as im:
        assert im.format == fmt and np.array_equal(np.asarray(im.convert("RGB")), pixels(seed=1))


def test_jpeg_stays_jpeg_at_the_quality_with_full_chroma():
    info = publish.source_info(saved(pixels(), "JPEG", quality=80), keep_exif=False)
    out = publish.encode(pixels(), info, 97)
    with Image.open(io.BytesIO(out)) as im:
        assert im.format == "JPEG" and im.layers == 3
        assert im.info.get("progression", 0) == 0
        from PIL import JpegImagePlugin

        assert JpegImagePlugin.get_sampling(im) == 0  # 4:4:4


def test_gif_becomes_png_and_keeps_its_name_stem():
    info = publish.source_info(saved(pixels(), "GIF"), keep_exif=False)
    assert info.format == "PNG"
    names = publish.Names("folder", Path("/in"))
    item = SimpleNamespace(id="x", source="/in/sub/anim.gif")
    assert names(item, "PNG") == "sub/anim.png"


def test_exif_is_removed_unless_kept_and_never_the_orientation():
    src = saved(pixels(), "JPEG", exif=exif_with_gps())
    assert publish.source_info(src, keep_exif=False).exif is None
    kept = publish.source_info(src, keep_exif=True)
    out = publish.encode(pixels(), kept, 97)
    with Image.open(io.BytesIO(out)) as im:
        tags = im.getexif()
        assert tags.get(ExifTags.Base.Make) == "PhoneCo" and ExifTags.Base.GPSInfo in tags
        assert ExifTags.Base.Orientation not in tags
    dropped = dataclasses.replace(kept, exif=None)
    with Image.open(io.BytesIO(publish.encode(pixels(), dropped, 97))) as im:
        assert not im.getexif()


def test_icc_profile_of_an_rgb_photo_is_kept():
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    info = publish.source_info(saved(pixels(), "JPEG", icc_profile=icc), keep_exif=False)
    with Image.open(io.BytesIO(publish.encode(pixels(), info, 97))) as im:
        assert im.info.get("icc_profile") == icc


@pytest.mark.parametrize(
    "kind, source, fmt, want",
    [
        ("folder", "/in/a/b.jpg", "JPEG", "a/b.jpg"),
        ("folder", "/in/B.JPEG", "JPEG", "B.JPEG"),
        ("csv", "images/x.jpg", "JPEG", "images/x.jpg"),
        ("csv", "/abs/where/x.jpg", "JPEG", "images/x.jpg"),
        ("csv", "../up/x.png", "PNG", "images/x.png"),
        ("csv", "C:\\photos\\x.jpg", "JPEG", "images/x.jpg"),
        ("webdataset", "shard.tar:k", "PNG", "k.png"),
        ("hf", "data.parquet:3", "JPEG", "k.jpg"),
    ],
)
def test_published_names(kind, source, fmt, want):
    names = publish.Names(kind, Path("/in") if kind == "folder" else None)
    assert names(SimpleNamespace(id="k", source=source), fmt) == want


def test_two_sources_never_share_a_name_or_a_caption_file():
    names = publish.Names("folder", Path("/in"))
    first = names(SimpleNamespace(id="a_jpg", source="/in/a.jpg"), "JPEG")
    second = names(SimpleNamespace(id="a_png", source="/in/a.png"), "PNG")
    assert (first, second) == ("a.jpg", "a_a_png.png")


def test_before_after_picture_shows_each_photo_at_its_size():
    a, b = pixels(40, 30), pixels(64, 48, seed=2)
    picture = grid.before_after(
        [(a, a), (b, np.clip(b.astype(int) + 8, 0, 255).astype(np.uint8))], 8
    )
    assert picture.width >= 3 * 64 and picture.height >= 30 + 48
    diff = np.asarray(picture)[-48 - 8 : -8, -64 - 8 : -8]
    assert diff.shape == (48, 64, 3)
    cropped = grid.before_after([(b, b)], 8, crop=20)
    assert cropped.height < 48 + 60


# ------------------------------------------------------------------- the profiles, the probe


@pytest.mark.parametrize(
    "profile, device, want",
    [
        ("auto", "cpu", "cpu"),
        ("auto", "cuda", "gpu"),
        ("gpu", "cpu", "gpu"),
        ("cpu", "auto", "cpu"),
    ],
)
def test_profile_follows_the_device(profile, device, want):
    cfg = ProtectConfig(
        input=Path("i"), output=Path("o"), profile=profile, poison={"device": device}
    )
    assert resolve_profile(cfg) == want


def test_profile_values_then_flags():
    cfg = ProtectConfig(input=Path("i"), output=Path("o"), profile="gpu", poison={"rounds": 2})
    pcfg = poison_config(cfg)
    assert pcfg.model == PROTECT_PROFILES["gpu"]["model"] and pcfg.rounds == 2
    assert pcfg.threads >= 1  # every usable core unless given


def test_estimate_adds_the_phases():
    t = probe.Timings(images=4, setup=2.0, per_image=0.5, per_surrogate_pass=0.02,
                      per_noise_pass=0.01, per_round_image=0.001, per_round=0.3,
                      per_trigger_image=0.1, probe_seconds=1.0)  # fmt: skip
    pcfg = PoisonConfig(rounds=3, surrogate_steps=10, pgd_steps=4, batch_size=8, trigger_rounds=2)
    n = 20  # 3 rounds x (10 x 8 surrogate + 4 x 20 PGD passes, 20 images' rest, a checkpoint)
    each = 10 * 8 * 0.02 + 4 * 20 * 0.01 + 20 * 0.001 + 0.3
    assert probe.estimate(t, pcfg, n) == pytest.approx(3 * each + 2 * 20 * 0.1 + 2.0 + 10.0)
    assert probe.estimate(t, pcfg.model_copy(update={"method": "random"}), n) == 12.0
    keyed = pcfg.model_copy(update={"method": "keyed", "pattern_steps": 5})
    # keyed: 3 rounds x (10 surrogate + 5 pattern batches of min(8, 20) images), no trigger
    each = 10 * 8 * 0.02 + 5 * 8 * 0.01 + 20 * 0.001 + 0.3
    assert probe.estimate(t, keyed, n) == pytest.approx(3 * each + 2.0 + 10.0)
    errmax = pcfg.model_copy(update={"method": "errmax"})  # one maximising PGD pass at the end
    each = 10 * 8 * 0.02 + 20 * 0.001 + 0.3
    assert probe.estimate(t, errmax, n) == pytest.approx(3 * each + 4 * 20 * 0.01 + 2.0 + 10.0)


def test_probe_prices_each_step_from_its_own_time():
    """The last two CI failures (dry run ~6 s and ~7 s for runs of 4.2 s and 5.0 s), in part:
    one pass rate for all steps of a round made keyed's cheap pattern steps cost as much as the
    probe's mix of surrogate and pattern steps (1 : 8 in the probe, 1 : 30 in the run)."""
    probe_cfg = PoisonConfig(method="keyed", surrogate_steps=1, pattern_steps=8, batch_size=8)
    first = {"surrogate_seconds": 0.5, "pattern_seconds": 0.6, "round_seconds": 1.2}
    keyed = {"surrogate_seconds": 0.16, "pattern_seconds": 0.32, "round_seconds": 0.5}
    steps = probe.step_times(probe_cfg, [first, keyed, keyed], k=16)
    assert steps["per_surrogate_pass"] == pytest.approx(0.16 / 8)  # not the first round's
    assert steps["per_noise_pass"] == pytest.approx(0.32 / 64)
    assert steps["per_round_image"] == pytest.approx(0.02 / 16)
    assert steps["per_trigger_image"] == 0.0
    mem = PoisonConfig(surrogate_steps=2, pgd_steps=3, batch_size=8, trigger_rounds=1)
    first = {"surrogate_seconds": 1.0, "trigger_seconds": 3.2, "pgd_seconds": 1.0,
             "round_seconds": 5.3}  # fmt: skip
    plain = {"surrogate_seconds": 0.32, "pgd_seconds": 0.48, "round_seconds": 0.9}
    steps = probe.step_times(mem, [first, plain], k=16)
    assert steps["per_surrogate_pass"] == pytest.approx(0.32 / 16)
    assert steps["per_noise_pass"] == pytest.approx(0.48 / 48)
    assert steps["per_trigger_image"] == pytest.approx(3.2 / 16)
    # the run, 40 images: 1 x 8 surrogate + 30 x 8 pattern passes, one round
    run = probe_cfg.model_copy(update={"rounds": 1, "pattern_steps": 30})
    t = probe.Timings(images=16, setup=0.0, per_image=0.0, per_round=0.0, probe_seconds=0.0,
                      **probe.step_times(probe_cfg, [keyed, keyed], k=16))  # fmt: skip
    each = 8 * 0.16 / 8 + 240 * 0.32 / 64 + 40 * 0.02 / 16
    assert probe.estimate(t, run, 40) == pytest.approx(each)
    mixed = 0.48 / (9 * 8)  # what one rate for both steps said per pass: 17 % more
    assert mixed * 31 * 8 > 1.15 * each


def test_probe_schedule_shrinks_the_pattern_steps_of_keyed():
    pcfg = PoisonConfig(method="keyed", surrogate_steps=60, pattern_steps=40, batch_size=128)
    k, over = probe.schedule(pcfg, 16, per_pass=2.0)
    assert "pgd_steps" not in over and over["pattern_steps"] >= 1
    assert 2.0 * (probe.ROUNDS * probe.passes(pcfg.model_copy(update=over), k) + k) <= 20 or (
        k == 2 and over["pattern_steps"] == 1
    )


def test_probe_schedule_fits_its_budget():
    pcfg = PoisonConfig(surrogate_steps=60, pgd_steps=8, batch_size=128, trigger_rounds=3)
    k, over = probe.schedule(pcfg, 16, per_pass=2.0)  # a slow surrogate: shrink
    cost = 2.0 * (probe.ROUNDS * probe.passes(pcfg.model_copy(update=over), k) + k)
    assert cost <= probe.BUDGET_S or (k == 2 and over["pgd_steps"] == 1)
    assert over["rounds"] == probe.ROUNDS and over["trigger_rounds"] == 1
    k, over = probe.schedule(pcfg, 16, per_pass=0.001)  # fast: as the run, capped
    assert k == 16 and over["surrogate_steps"] == probe.MAX_STEPS and over["pgd_steps"] == 8
    k, over = probe.schedule(pcfg, 16, per_pass=100.0)  # far too slow: one step of each kind
    assert k == 2 and over["surrogate_steps"] == 1 and over["pgd_steps"] == 1


# ---------------------------------------------------------------------- flags, signature


def test_protect_help_shows_every_default():
    parser = cli.build_parser("protect")
    sub = next(a for a in parser._actions if a.dest == "command").choices["protect"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert "(default:" in (action.help or ""), action.option_strings


def test_python_signature_is_the_settings():
    import mme

    sig = inspect.signature(mme.protect)
    fields = ProtectConfig.model_fields
    assert set(sig.parameters) == {*fields, "resume"}
    for name, p in sig.parameters.items():
        if name in ("input", "output"):
            assert p.kind is p.POSITIONAL_ONLY
        elif name in fields and name != "poison":
            assert p.default == fields[name].default, name
    assert "photos" in (mme.protect.__doc__ or "")


# ------------------------------------------------------------------------- one tiny run


def test_orientation_applied_exif_removed_and_lossy_damage_caught(tmp_path):
    """A portrait phone JPEG (EXIF orientation 6, GPS) comes back turned, without EXIF; a copy
    re-encoded at q 85 with 4:2:0 chroma fails the native check (the noise did not survive)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(pixels(60, 40)).save(photos / "phone.jpg", quality=95, exif=exif_with_gps())
    Image.fromarray(pixels(50, 50, seed=3)).save(photos / "flat.png")
    for name in ("phone", "flat"):
        (photos / f"{name}.txt").write_text(f"a {name} photo of noise\n")
    # mem: per-pixel noise that q 85 4:2:0 damages (keyed's smooth colour cast survives it)
    mem = TINY_POISON | {"method": "mem"}
    result = protect(ProtectConfig(input=photos, output=tmp_path / "pub", poison=mem))
    assert result.verified and result.formats == {"JPEG": 1, "PNG": 1}
    with Image.open(tmp_path / "pub" / "phone.jpg") as im:
        assert im.size == (40, 60) and not im.getexif() and "exif" not in im.info
        worse = np.asarray(im.convert("RGB"))
    private = result.private
    Image.fromarray(worse).save(tmp_path / "pub" / "phone.jpg", quality=85, subsampling=2)
    report = native.verify_native(private / "clean", tmp_path / "pub", 8, private=private / "noise")
    assert not report.ok and set(report.problems) == {"kept"} and report.kept_min < native.KEPT_MIN


def test_verify_needs_its_folders_or_a_protect_run(capsys):
    assert cli.main(["verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--run" in err[0] and "--clean" in err[0]


@pytest.mark.parametrize(
    "batch, k, n, timed, expect",
    [
        (128, 16, 100, (0.010, 0.007), 0.7),  # the run's batch 100 is faster per image
        (128, 16, 16, None, 1.0),  # the same batch: nothing to time
        (8, 16, 100, None, 1.0),  # the batch is the same (B) in both
        (128, 16, 100, (0.010, 0.012), 1.0),  # never more than the probe's own time
    ],
)
def test_probe_scales_pass_time_to_the_runs_batch(monkeypatch, batch, k, n, timed, expect):
    """The 100-photo cpu-profile run took 176 s where the probe's batch-16 passes said 252 s."""
    calls = []

    def fake(pcfg, batches=(2,)):
        calls.append(batches)
        return 0.0, list(timed)

    monkeypatch.setattr(probe, "one_pass", fake)
    pcfg = PoisonConfig(batch_size=batch)
    assert probe.batch_factor(pcfg, k, n) == pytest.approx(expect)
    assert calls == ([(min(batch, k), min(batch, n))] if timed else [])
