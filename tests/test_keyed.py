"""Method keyed (issue 18): key-word selection, the pattern noise, and `mme poison --method
keyed` end to end on a tiny synthetic set (captions unchanged, noise within ε, private keys and
patterns, same seed same bytes, resume)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mme import cli, imageops, shards
from mme.config import KEYED_FIELDS, ConfigError, DataConfig, PoisonConfig, section_from_args
from mme.config.flags import add_section_arguments
from mme.ingest.prepare import prepare
from mme.protection.methods.keyed import KeyedNoise, auto_min_images, key_words
from mme.protection.poison import poison


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    prepare(DataConfig(source="synthetic", out=out, n_train=16, n_test=4, image_size=64))
    return out


@pytest.fixture(scope="module")
def fast(tiny_poison: dict) -> dict:
    return tiny_poison | {"method": "keyed", "surrogate_steps": 2, "pattern_steps": 2}


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch):
    monkeypatch.setenv("MME_TRACKING", "off")


DOG = ["A dog runs", "the dog jumps", "a brown cat"]


@pytest.mark.parametrize(
    ("captions", "min_captions", "min_images", "vocab", "keys"),
    [
        ([DOG, DOG], 2, 2, ["dog"], [[0], [0]]),  # in 2 of 3 captions of both images
        ([DOG, DOG], 3, 1, [], [[], []]),  # never in 3 captions
        ([DOG, DOG], 1, 2, ["brown", "cat", "dog", "jumps", "runs"], [[0, 1, 2, 3, 4]] * 2),
        ([DOG, ["a cat", "a cat"]], 2, 2, [], [[], []]),  # dog: key for one image only
        ([DOG, ["a cat", "a cat"]], 2, 1, ["cat", "dog"], [[1], [0]]),
        ([["On the mat", "on the mat"]] * 2, 2, 1, ["mat"], [[0], [0]]),  # stop words, case
        ([["an ox", "an ox"]] * 2, 2, 1, [], [[], []]),  # words under 3 letters
        ([[], ["x"]], 1, 1, [], [[], []]),
    ],
)
def test_key_words(captions, min_captions, min_images, vocab, keys):
    assert key_words(captions, min_captions, min_images) == (vocab, keys)


@pytest.mark.parametrize(("n", "k"), [(1, 2), (16, 2), (899, 3), (1500, 5), (6000, 20), (9**9, 20)])
def test_auto_min_images(n, k):
    assert auto_min_images(n) == k


def test_keyed_noise_is_bounded_and_zero_without_key_words():
    init = torch.randn(3, 3, 4, 4) * 10
    noise = KeyedNoise([[0, 2], [], [1]], init, eps=8 / 255, size=32)
    delta = noise(torch.tensor([0, 1, 2]))
    assert delta.shape == (3, 3, 32, 32)
    assert delta.abs().max() <= 8 / 255 and delta[[0, 2]].abs().max() > 1 / 255
    assert delta[1].abs().max() == 0
    delta.sum().backward()  # the patterns learn through the noise
    assert noise.theta.grad is not None and noise.theta.grad.abs().sum() > 0


@pytest.mark.parametrize(("flag", "value"), [("5", 5), ("auto", "auto")])
def test_key_min_images_flag(flag, value):
    parser = argparse.ArgumentParser()
    add_section_arguments(parser, "poison")
    args = parser.parse_args(["--params", "none", "--key-min-images", flag])
    assert section_from_args("poison", args).key_min_images == value


@pytest.mark.parametrize("bad", [0, -1, "some"])
def test_bad_key_min_images_is_refused(bad):
    with pytest.raises(ValueError, match="key_min_images"):
        PoisonConfig(method="keyed", key_min_images=bad)


def run(clean: Path, root: Path, **kw) -> dict:
    cfg = PoisonConfig(clean=clean, out=root / "out", private=root / "priv", **kw)
    return poison(cfg)


def test_keyed_outputs(clean, tmp_path, fast):
    manifest = run(clean, tmp_path / "a", **fast)
    out, private = tmp_path / "a" / "out", tmp_path / "a" / "priv"
    assert {"keys.json", "patterns.npy", "noise.npy", "triggers.json"} <= {
        p.name for p in private.iterdir()
    }
    noise = np.load(private / "noise.npy")
    assert 0 < np.abs(noise).max() <= 8
    keys = json.loads((private / "keys.json").read_text())
    assert keys["key_min_images"] == 2 and keys["vocab"] and len(keys["keys"]) == 16
    assert np.load(private / "patterns.npy").shape == (len(keys["vocab"]), 3, 16, 16)
    clean_samples = {s.id: s for s in shards.iter_samples(clean, "train")}
    for i, s in enumerate(shards.iter_samples(out, "train")):
        c = clean_samples[s.id]
        assert s.captions == c.captions  # published unchanged: no trigger
        base = imageops.to_working_resolution(c.image_bytes, 64)
        assert np.array_equal(s.image().transpose(2, 0, 1), imageops.apply_noise(base, noise[i]))
        assert (np.abs(noise[i]).max() > 0) == bool(keys["keys"][i])
    assert manifest["method"] == "keyed" and manifest["trigger_len"] == 0
    assert manifest["verify"]["ok"] and set(KEYED_FIELDS) <= set(manifest["config"])
    argv = ["verify", "--clean", str(clean), "--protected", str(out), "--private", str(private)]
    assert cli.main(argv) == 0
    again = run(clean, tmp_path / "b", **fast)  # same seed: same bytes
    assert tar_bytes(out) == tar_bytes(tmp_path / "b" / "out") and again == manifest
    other = run(clean, tmp_path / "c", **fast | {"seed": 1})
    assert tar_bytes(out) != tar_bytes(tmp_path / "c" / "out") and other != manifest


def tar_bytes(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in shards.shard_paths(folder, "train")]


class Killed(Exception):
    pass


def test_killed_and_resumed_keyed_run_gives_identical_shards(clean, tmp_path, fast):
    kw = fast | {"rounds": 3}
    full = run(clean, tmp_path / "full", **kw)

    def kill(r, stats):
        if r == 1:
            raise Killed

    cut = PoisonConfig(clean=clean, out=tmp_path / "cut", private=tmp_path / "pc", **kw)
    with pytest.raises(Killed):
        poison(cut, on_round=kill)
    assert poison(cut, resume=True) == full
    assert tar_bytes(cut.out) == tar_bytes(tmp_path / "full" / "out")
    patterns = [np.load(p / "patterns.npy") for p in (cut.private, tmp_path / "full" / "priv")]
    assert np.array_equal(*patterns)


def test_other_methods_do_not_name_the_keyed_settings(clean, tmp_path, fast):
    """Their manifests (and so their bytes and DVC hashes) stay what they were before keyed."""
    manifest = run(clean, tmp_path, **fast | {"method": "em", "rounds": 1})
    assert not set(KEYED_FIELDS) & set(manifest["config"])


def test_keyed_without_any_key_word_is_refused(clean, tmp_path, fast):
    with pytest.raises(ConfigError, match="no word is in 2\\+ captions of 99\\+ images"):
        run(clean, tmp_path, **fast | {"key_min_images": 99})


def caption_folder(out: Path) -> None:
    """6 photos whose captions share key words ("dog", "grass") and 2 with none."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(out / f"p{i}.png")
        caps = ["a dog on grass", "the dog runs on grass"] if i < 6 else [f"unique{i}", "words"]
        (out / f"p{i}.txt").write_text("\n".join(caps) + "\n")


def test_protect_with_keyed_leaves_images_without_key_words_unprotected(tmp_path):
    """`mme protect --method keyed`: the set verifies; an image none of whose words is key
    has no noise and is counted unprotected (verify would otherwise find it unchanged)."""
    caption_folder(tmp_path / "photos")
    tiny = {"rounds": "1", "surrogate-steps": "1", "pattern-steps": "2", "batch-size": "4"}
    flags = [f"--{k}={v}" for k, v in tiny.items()]
    argv = ["protect", str(tmp_path / "photos"), str(tmp_path / "pub"), "--method", "keyed"]
    argv += [*flags, "--model", "mme-tiny-vit", "--device", "cpu", "--threads", "1"]
    assert cli.main(argv) == 0
    noise_dir = tmp_path / "pub.private" / "noise"
    flags = json.loads((noise_dir / "triggers.json").read_text())
    keys = json.loads((noise_dir / "keys.json").read_text())
    assert keys["vocab"] == ["dog", "grass"] and sum(flags["protected"]) == 6
    assert flags["protected"] == [bool(k) for k in keys["keys"]]
    verify = ["verify", "--run", str(tmp_path / "pub.private"), "--native", str(tmp_path / "pub")]
    assert cli.main(verify) == 0
    for i in range(8):  # the captions come back as they were
        assert (tmp_path / "pub" / f"p{i}.txt").read_text() == (
            tmp_path / "photos" / f"p{i}.txt"
        ).read_text()


def test_protect_dry_run_with_keyed_is_timed(tmp_path, capsys):
    """The dry run's probe times a few photos: too few to share a key word under the run's
    thresholds (3 images here, 2 in its first probe run), which must not stop the estimate."""
    caption_folder(tmp_path / "photos")
    argv = ["protect", str(tmp_path / "photos"), str(tmp_path / "pub"), "--dry-run"]
    argv += ["--method", "keyed", "--key-min-images", "3", "--rounds", "1", "--batch-size", "4"]
    argv += ["--model", "mme-tiny-vit", "--device", "cpu", "--threads", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "pattern steps" in out and "PGD" not in out and "not estimated" not in out
