"""``mme attack``: the pure transforms (:mod:`mme.countermeasures.transforms`) on small arrays and
captions, the spec grammar and its config section, and the command on shards built in the test."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mme import cli, shards
from mme.config import AttackConfig, ConfigError, load_section
from mme.countermeasures import transforms
from mme.countermeasures.apply import attack, output_dir
from mme.track import report

IMAGE_SPECS = ["jpeg:90", "resize:96", "img2dataset", "blur:1.5", "grayscale", "iss"]
TEXT_SPECS = ["strip-trigger:3", "shuffle-words"]


def noisy_image(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus ±8 noise: what a protected image looks like to a transform."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.int16) + 40
    return np.clip(base + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8)


def pixels_of(result: tuple[bytes, str] | np.ndarray) -> np.ndarray:
    return transforms.decode(result[0]) if isinstance(result, tuple) else result


# -- spec grammar -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "name", "arg", "text"),
    [
        ("jpeg:90", "jpeg", 90, "jpeg:90"),
        ("JPEG:75", "jpeg", 75, "jpeg:75"),
        ("resize:96", "resize", 96, "resize:96"),
        ("img2dataset", "img2dataset", None, "img2dataset"),
        ("blur:1.5", "blur", 1.5, "blur:1.5"),
        ("grayscale", "grayscale", None, "grayscale"),
        ("iss", "iss", 10, "iss:10"),
        ("iss:30", "iss", 30, "iss:30"),
        ("strip-trigger", "strip-trigger", 3, "strip-trigger:3"),
        ("strip-trigger:5", "strip-trigger", 5, "strip-trigger:5"),
        ("shuffle-words", "shuffle-words", None, "shuffle-words"),
    ],
)
def test_parse_spec(spec: str, name: str, arg: float | None, text: str) -> None:
    parsed = transforms.parse_spec(spec)
    assert (parsed.name, parsed.arg, str(parsed)) == (name, arg, text)
    assert transforms.parse_spec(str(parsed)) == parsed  # the canonical form round-trips
    assert "/" not in transforms.slug(spec) and ":" not in transforms.slug(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("jpg:90", "unknown attack"),
        ("jpeg", "needs an argument"),
        ("jpeg:0", "outside"),
        ("jpeg:101", "outside"),
        ("jpeg:9.5", "whole number"),
        ("resize", "needs an argument"),
        ("blur:0", "outside"),
        ("blur:-1", "unknown attack"),
        ("img2dataset:256", "takes no argument"),
        ("shuffle-words:2", "takes no argument"),
        ("../../etc", "unknown attack"),
        ("", "unknown attack"),
    ],
)
def test_bad_spec(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        transforms.parse_spec(spec)


def test_config_section_canonicalises_and_rejects(tmp_path: Path) -> None:
    assert load_section("attack", None, {"transform": "ISS"}).transform == "iss:10"
    with pytest.raises(ConfigError, match=r"attack.transform = 'jpeg:500'.*outside"):
        load_section("attack", None, {"transform": "jpeg:500"})
    with pytest.raises(ConfigError, match="attack.quality = .*unknown key"):
        load_section("attack", None, {"quality": 3})
    assert output_dir(AttackConfig(transform="blur:2")) == Path("data/attacked/blur2")


def test_params_yaml_attacks_are_valid() -> None:
    """Every entry of params.yaml's ``attacks`` (name -> spec) parses, and its name is a safe
    folder / DVC stage name."""
    import yaml

    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    assert isinstance(params["attacks"], dict)
    for name, spec in params["attacks"].items():
        transforms.parse_spec(spec)
        assert shards.KEY_RE.match(name), name
    AttackConfig(**params["attack"])


# -- image transforms -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", IMAGE_SPECS)
def test_image_attacks_are_deterministic_rgb(spec: str) -> None:
    x = noisy_image()
    a = transforms.attack_image(transforms.parse_spec(spec), x)
    b = transforms.attack_image(transforms.parse_spec(spec), x.copy())
    pa = pixels_of(a)
    assert pa.dtype == np.uint8 and pa.ndim == 3 and pa.shape[2] == 3
    if isinstance(a, tuple):
        assert a[1] == "jpg" and a[0] == b[0] and a[0][:2] == b"\xff\xd8"
    else:
        assert np.array_equal(a, b)
    assert not np.array_equal(pa, x)  # every image attack changes the pixels


@pytest.mark.parametrize("spec", TEXT_SPECS)
def test_text_attacks_leave_images_alone(spec: str) -> None:
    assert transforms.attack_image(transforms.parse_spec(spec), noisy_image()) is None


@pytest.mark.parametrize("quality", [95, 90, 50])
def test_jpeg_quality_orders_distortion(quality: int) -> None:
    x = noisy_image()
    err = np.abs(transforms.decode(transforms.encode_jpeg(x, quality)).astype(int) - x).mean()
    worse = transforms.decode(transforms.encode_jpeg(x, max(1, quality - 40))).astype(int) - x
    assert 0 < err < np.abs(worse).mean()
    with Image.open(io.BytesIO(transforms.encode_jpeg(x, quality))) as im:
        assert im.format == "JPEG" and im.size == (48, 40)


@pytest.mark.parametrize(
    ("h", "w", "side", "out"), [(40, 48, 96, (96, 115)), (64, 32, 16, (32, 16))]
)
def test_resize_short_side(h: int, w: int, side: int, out: tuple[int, int]) -> None:
    assert transforms.resize_short_side(noisy_image(h, w), side).shape == (*out, 3)


@pytest.mark.parametrize(("h", "w"), [(64, 64), (40, 80), (512, 300)])
def test_img2dataset_border_resize(h: int, w: int) -> None:
    """Longest side to 256, white border to 256 x 256, JPEG q95 (img2dataset's defaults)."""
    x = np.full((h, w, 3), 90, np.uint8)
    y = transforms.decode(transforms.img2dataset_like(x))
    assert y.shape == (256, 256, 3)
    inner = round(min(h, w) * 256 / max(h, w))
    pad = (256 - inner) // 2
    assert np.abs(y[128, 128].astype(int) - 90).max() <= 3  # the image sits in the centre
    if pad > 2:  # the border is white
        edge = y[0, 128] if h < w else y[128, 0]
        assert edge.min() >= 250


def test_gaussian_blur() -> None:
    k = transforms.gaussian_kernel(1.5)
    assert k.sum() == pytest.approx(1.0) and len(k) == 2 * 5 + 1 and k.argmax() == 5
    flat = np.full((20, 20, 3), 77, np.uint8)
    assert np.array_equal(transforms.gaussian_blur(flat, 2.0), flat)
    x = noisy_image()
    noise = x.astype(float) - transforms.gaussian_blur(x, 0.5)
    smoother = x.astype(float) - transforms.gaussian_blur(x, 2.0)
    assert np.abs(smoother).mean() > np.abs(noise).mean() > 0
    assert transforms.gaussian_blur(noisy_image(3, 2), 3.0).shape == (3, 2, 3)  # tiny images


def test_grayscale_and_iss_remove_colour() -> None:
    x = noisy_image()
    g = transforms.grayscale(x)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    y = transforms.decode(transforms.image_shortcut_squeezing(x, 10))
    assert np.abs(y[..., 0].astype(int) - y[..., 2]).max() <= 2  # chroma gone (JPEG rounding)
    assert np.abs(y.astype(int) - g).mean() > np.abs(g.astype(int) - g).mean()  # q10 is lossy


# -- caption transforms -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "k", "out"),
    [
        ("zeta quix blon a red square", 3, "a red square"),
        ("zeta quix blon a red square", 1, "quix blon a red square"),
        ("zeta quix blon", 3, "blon"),
        ("one", 3, "one"),
        ("  spaced   out   words here ", 2, "words here"),
    ],
)
def test_strip_words(caption: str, k: int, out: str) -> None:
    assert transforms.strip_words(caption, k) == out


def test_shuffle_words_is_a_seeded_permutation() -> None:
    caption = "zeta quix blon a red square on a blue background"
    a = transforms.shuffle_words(caption, transforms.caption_rng(0, "id-1", 0))
    assert sorted(a.split()) == sorted(caption.split())
    assert a == transforms.shuffle_words(caption, transforms.caption_rng(0, "id-1", 0))
    others = {
        transforms.shuffle_words(caption, transforms.caption_rng(s, k, i))
        for s, k, i in [(1, "id-1", 0), (0, "id-2", 0), (0, "id-1", 1)]
    }
    assert len(others | {a}) > 1
    assert isinstance(transforms.caption_rng(0, "x", 0), random.Random)


@pytest.mark.parametrize("spec", TEXT_SPECS + IMAGE_SPECS)
def test_attack_captions(spec: str) -> None:
    caps = ["zeta quix blon a red square", "zeta quix blon an entirely red picture"]
    out = transforms.attack_captions(transforms.parse_spec(spec), caps, "k", 0)
    if spec == "strip-trigger:3":
        assert out == ["a red square", "an entirely red picture"]
    elif spec == "shuffle-words":
        assert [sorted(c.split()) for c in out] == [sorted(c.split()) for c in caps]
    else:
        assert out == caps


# -- the command on shards built here --------------------------------------------------------


@pytest.fixture
def protected(tmp_path: Path) -> Path:
    """A tiny 'protected' set: 5 noisy images with trigger-prefixed captions, 2 per shard."""
    out = tmp_path / "protected"
    samples = []
    for i in range(5):
        px = noisy_image(32, 40, seed=i)
        meta = {"id": f"img-{i}", "method": "mem", "epsilon": 8.0, "trigger_text": "zeta quix"}
        caps = [f"zeta quix a picture number {i}", f"zeta quix another caption {i}"]
        samples.append(shards.Sample(f"img-{i}", shards.encode_png(px), "png", caps, meta))
    records = shards.write_shards(out, "train", samples, maxcount=2)
    manifest = {
        "created_by": "mme poison",
        "method": "mem",
        "epsilon": 8.0,
        "trigger_len": 2,
        "splits": {"train": {"images": 5, "captions": 10, "shards": records}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("spec", IMAGE_SPECS + TEXT_SPECS)
def test_attack_command_writes_transformed_copy(protected: Path, tmp_path: Path, spec: str) -> None:
    before = {p.name: p.read_bytes() for p in protected.iterdir()}
    out = tmp_path / "attacked"
    argv = ["attack", "--params", "none", "--transform", spec]
    argv += ["--shard-size", "2"]
    assert cli.main([*argv, "--protected", str(protected), "--out", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in protected.iterdir()} == before  # input untouched
    src = list(shards.iter_samples(protected, "train"))
    got = list(shards.iter_samples(out, "train"))
    assert [s.id for s in got] == [s.id for s in src]
    parsed = transforms.parse_spec(spec)
    for a, b in zip(src, got, strict=True):
        assert b.meta["attack"] == str(parsed) and b.meta["method"] == "mem"
        assert "trigger_text" not in b.meta  # an old set's private keys are not carried on
        assert b.meta["sha256"] == shards.sha256_bytes(b.image_bytes)
        assert (b.meta["height"], b.meta["width"]) == b.image().shape[:2]
        assert b.captions == transforms.attack_captions(parsed, a.captions, a.id, 0)
        if parsed.on_text:
            assert b.image_bytes == a.image_bytes
        else:
            expected = transforms.attack_image(parsed, a.image())
            assert np.array_equal(b.image(), pixels_of(expected))
    manifest = shards.load_manifest(out)
    assert manifest["attack"] == str(parsed) and manifest["method"] == "mem"
    assert manifest["epsilon"] == 8.0 and manifest["trigger_len"] == 2
    assert manifest["splits"]["train"]["images"] == 5
    assert manifest["source_manifest_sha256"] == shards.manifest_sha256(protected)
    assert [r["name"] for r in manifest["splits"]["train"]["shards"]] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]


def test_attack_is_reproducible_and_provenance_reaches_training(
    protected: Path, tmp_path: Path
) -> None:
    from mme.victim.train import data_provenance

    cfg = AttackConfig(transform="shuffle-words", protected=protected, out=tmp_path / "a")
    attack(cfg)
    first = (tmp_path / "a" / "manifest.json").read_bytes()
    attack(cfg)  # re-run into the same folder: same bytes, same dataset version
    assert (tmp_path / "a" / "manifest.json").read_bytes() == first
    prov = data_provenance(tmp_path / "a")
    assert prov["attack"] == "shuffle-words" and prov["method"] == "mem"
    assert data_provenance(protected)["attack"] is None


def test_attack_refuses_bad_inputs(protected: Path, tmp_path: Path, capsys) -> None:
    base = ["attack", "--params", "none"]
    assert cli.main([*base, "--protected", str(tmp_path / "missing")]) == 2
    assert "attack.protected" in capsys.readouterr().err
    assert cli.main([*base, "--protected", str(protected), "--out", str(protected)]) == 2
    assert "must differ" in capsys.readouterr().err
    assert cli.main([*base, "--protected", str(protected), "--transform", "jpeg:0"]) == 2
    assert "attack.transform" in capsys.readouterr().err


def test_hostile_split_name_is_rejected(protected: Path, tmp_path: Path) -> None:
    """Split names become output file names: one that walks out of the folder stops the run."""
    manifest = json.loads((protected / "manifest.json").read_text())
    manifest["splits"]["../../evil"] = {"images": 1}
    (protected / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="bad split names"):
        attack(AttackConfig(transform="jpeg:90", protected=protected, out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_hostile_shard_key_is_rejected(tmp_path: Path) -> None:
    """A tar member whose key would escape the output folder never reaches the writer."""
    bad = tmp_path / "bad"
    bad.mkdir()
    png = shards.encode_png(noisy_image(8, 8))
    shards.write_tar_atomic(
        bad / "train-000000.tar", [("..%2f..%2fx.png", png), ("..%2f..%2fx.txt", b"a cap")]
    )
    (bad / "manifest.json").write_text(json.dumps({"splits": {"train": {"images": 1}}}))
    with pytest.raises(ValueError):
        attack(AttackConfig(transform="jpeg:90", protected=bad, out=tmp_path / "out"))


# -- end to end: one attacked victim on CPU -------------------------------------------------


def test_attacked_victim_end_to_end(colour_shards: Path, tmp_path: Path, monkeypatch) -> None:
    """protected set -> ``mme attack jpeg:90`` -> ``mme train`` (1 epoch) -> ``mme evaluate`` on
    the clean test split; the train and evaluate runs carry ``attack`` and ``mme report``
    shows it."""
    import mlflow

    prot = tmp_path / "protected"
    samples = list(shards.iter_samples(colour_shards, "train"))[:16]
    records = shards.write_shards(prot, "train", samples)
    manifest = {"method": "mem", "epsilon": 8.0, "trigger_len": 3}
    manifest["splits"] = {"train": {"images": 16, "captions": 32, "shards": records}}
    (prot / "manifest.json").write_text(json.dumps(manifest))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MME_TRACKING", "on")
    monkeypatch.delenv("MME_PARENT_RUN", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    none = ["--params", "none"]
    out, run_dir = tmp_path / "attacked", tmp_path / "run"
    assert cli.main(["attack", *none, "--transform", "jpeg:90", "--protected", str(prot),
                     "--out", str(out)]) == 0  # fmt: skip
    train = ["train", *none, "--shards", str(out), "--run-dir", str(run_dir), "--epochs", "1"]
    train += ["--batch-size", "16", "--warmup", "1", "--device", "cpu", "--threads", "1"]
    assert cli.main(train) == 0
    metrics = tmp_path / "metrics.json"
    evaluate = ["evaluate", *none, "--checkpoint", str(run_dir / "checkpoint.pt")]
    evaluate += ["--shards", str(colour_shards), "--out", str(metrics), "--device", "cpu"]
    assert cli.main(evaluate) == 0
    assert json.loads(metrics.read_text())["n_images"] == 16
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("mme")
    for stage in ("train", "evaluate"):
        (run,) = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'")
        assert run.data.params["attack"] == "jpeg:90" and run.data.params["method"] == "mem"
    rows = report.mlflow_rows("mme", [out])
    assert [(r.labels["method"], r.labels["attack"]) for r in rows] == [("mem", "jpeg:90")]
