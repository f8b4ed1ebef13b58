"""Tests of mme.verify: a valid protected set passes; each kind of damage fails with its id."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mme.cli import main
from mme.imageops import apply_noise, to_working_resolution
from mme.models import load_tokenizer, token_ids
from mme.protection.methods.triggers import protected_caption
from mme.protection.verify import verify
from mme.shards import Sample, encode_png, sha256_bytes, write_json_atomic, write_shards

SIZE = 24  # working resolution S
EPS = 8
WORDS = ["red", "dog", "house", "blue"]  # single CLIP-BPE tokens that round-trip exactly
MODEL = "mme-tiny-vit"


def make_clean(root: Path, n: int = 8, seed: int = 0) -> list[Sample]:
    """Clean shards (train + test) of random images of mixed sizes, 2 captions each."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        h, w = (SIZE, SIZE) if i % 2 else (SIZE + 8, SIZE + 4)  # some need resizing to S
        data = encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        meta = {"id": f"img{i:03d}", "source": "test", "sha256": sha256_bytes(data)}
        meta.update(width=w, height=h)
        caps = [f"a photo number {i}", f"another caption of image {i}"]
        samples.append(Sample(f"img{i:03d}", data, "png", caps, meta))
    train = write_shards(root, "train", samples, maxcount=3)
    write_shards(root, "test", samples[:2])
    splits = {"train": {"images": n, "captions": 2 * n, "shards": train}}
    write_json_atomic(root / "manifest.json", {"created_by": "mme prepare", "splits": splits})
    return samples


def protect(samples: list[Sample], eps: int = EPS, seed: int = 1) -> list[dict[str, Any]]:
    """Records of a correct protected set: uniform integer noise in [-eps, eps], 1-word trigger."""
    rng = np.random.default_rng(seed)
    tok = load_tokenizer(MODEL)
    records = []
    for i, s in enumerate(samples):
        clean = to_working_resolution(s.image_bytes, SIZE)
        noise = rng.integers(-eps, eps + 1, clean.shape).astype(np.int8)
        word = WORDS[i % len(WORDS)]
        records.append(
            {
                "id": s.id,
                "clean": clean,
                "noise": noise,
                "pixels": apply_noise(clean, noise),
                "captions": [f"{word} {c}" for c in s.captions],
                "trigger_text": word,
                "trigger_ids": token_ids(tok, [word])[0],
                "protected": True,
                "clean_sha256": s.meta["sha256"],
            }
        )
    return records


def write_protected(out: Path, clean: Path, records: list[dict], eps: float = EPS, **cfg) -> Path:
    """Write records in the ``mme poison`` format: shards, manifest, noise.npy, triggers.json
    (triggers.json as poison writes it for MEM: a ``protected`` flag and a trigger per row).
    A record's ``leak`` keys are also written to its public meta (sets made before they
    became private)."""
    samples = []
    for r in records:
        png = encode_png(r["pixels"].transpose(1, 2, 0))
        h, w = r["pixels"].shape[1:]
        # public meta: the trigger and the protected flag live in triggers.json only
        meta = {"id": r["id"], **{k: r[k] for k in r.get("leak", ())}}
        meta.update(source="test", sha256=sha256_bytes(png), width=w, height=h)
        meta.update(method="mem", epsilon=eps)
        samples.append(Sample(r["id"], png, "png", r["captions"], meta))
    shards = write_shards(out, "train", samples, maxcount=4)
    config = {"method": "mem", "epsilon": eps, "model": MODEL, "trigger_len": 1, **cfg}
    n, n_caps = len(samples), sum(len(s.captions) for s in samples)
    splits = {"train": {"images": n, "captions": n_caps, "shards": shards}}
    manifest = {"created_by": "mme poison", "config": config, "clean": str(clean)}
    write_json_atomic(out / "manifest.json", {**manifest, "working_size": SIZE, "splits": splits})
    np.save(out / "noise.npy", np.stack([r["noise"] for r in records]))
    triggers = {
        k: [r[k] for r in records] for k in ("id", "protected", "trigger_ids", "trigger_text")
    }
    if all("trigger_word" in r for r in records):
        triggers["trigger_word"] = [r["trigger_word"] for r in records]
    private = {"ids": triggers.pop("id"), **triggers, "epsilon": eps}  # as poison records it
    write_json_atomic(out / "triggers.json", private)
    return out


@pytest.fixture
def sets(tmp_path: Path) -> tuple[Path, list[Sample], list[dict]]:
    clean = tmp_path / "clean"
    samples = make_clean(clean)
    return clean, samples, protect(samples)


def run_verify(clean: Path, prot: Path, *extra: str) -> int:
    # the fixture keeps the private files (noise.npy, triggers.json) beside the shards
    argv = ["verify", "--clean", str(clean), "--protected", str(prot), "--private", str(prot)]
    return main([*argv, *extra])


@pytest.mark.parametrize("model", [MODEL, "ViT-B-32", "some-custom-config"])
def test_valid_set_passes(sets, tmp_path, capsys, model):
    clean, samples, records = sets
    prot = write_protected(tmp_path / "P", clean, records, model=model)
    assert run_verify(clean, prot, "--json", str(tmp_path / "r.json")) == 0
    out = capsys.readouterr().out
    assert "result: OK" in out and "PSNR" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["n_checked"] == len(samples) == report["n_protected"]
    assert 0 < report["max_linf"] <= EPS and report["noise_checked"]


def test_trigger_words_round_trip():
    tok = load_tokenizer(MODEL)
    for word in WORDS:
        assert len(token_ids(tok, [word])[0]) == 1
        assert token_ids(tok, [f"{word} a cat"])[0][:1] == token_ids(tok, [word])[0]


@pytest.mark.parametrize("over", [0, 1, 5])
def test_linf_bound_is_exact(sets, tmp_path, capsys, over):
    """A pixel at exactly ε passes; one grey level more fails and names the id."""
    clean, _, records = sets
    r = records[3]
    c = int(r["clean"][1, 2, 3])
    d = (EPS + over) if c + EPS + over <= 255 else -(EPS + over)
    r["noise"][1, 2, 3] = d  # keep noise.npy consistent, so only the bound can fail
    r["pixels"] = apply_noise(r["clean"], r["noise"])
    prot = write_protected(tmp_path / "P", clean, records)
    code = run_verify(clean, prot)
    report = verify(clean, prot, private=prot)
    if over == 0:
        assert code == 0 and report.ok and report.max_linf == EPS
    else:
        assert code == 1 and report.violations["linf"] == [r["id"]]
        assert report.offending_ids == [r["id"]] and report.max_linf == EPS + over
        captured = capsys.readouterr()
        assert r["id"] in captured.out and r["id"] in captured.err


def test_epsilon_override(sets, tmp_path):
    clean, samples, records = sets
    prot = write_protected(tmp_path / "P", clean, records)
    assert run_verify(clean, prot, "--epsilon", str(EPS - 1)) == 1
    assert len(verify(clean, prot, epsilon=EPS - 1, private=prot).violations["linf"]) == len(
        samples
    )


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_missing_id_fails(sets, tmp_path, capsys, where):
    clean, _, records = sets
    i = {"first": 0, "middle": 4, "last": len(records) - 1}[where]
    gone = records.pop(i)
    prot = write_protected(tmp_path / "P", clean, records)
    assert run_verify(clean, prot) == 1
    assert gone["id"] in capsys.readouterr().out
    report = verify(clean, prot, private=prot)
    assert report.violations["missing"] == [gone["id"]]
    assert report.offending_ids == [gone["id"]]  # the others still pair up despite the gap


def test_extra_and_duplicate_ids_fail(sets, tmp_path):
    clean, _, records = sets
    extra = dict(records[0], id="stranger")
    prot = write_protected(tmp_path / "P", clean, [*records, extra, records[1]])
    report = verify(clean, prot, private=prot)
    assert report.violations["extra"] == ["stranger"]
    assert report.violations["duplicate"] == [records[1]["id"]]
    assert not report.ok


def test_out_of_order_set_passes(sets, tmp_path):
    clean, _, records = sets
    prot = write_protected(tmp_path / "P", clean, records[::-1])
    report = verify(clean, prot, private=prot)
    assert report.ok, report.table()
    assert report.n_checked == len(records)


@pytest.mark.parametrize("damage", ["wrong_id", "text_differs", "extra_id", "no_ids"])
def test_wrong_trigger_fails(sets, tmp_path, damage):
    clean, _, records = sets
    r = records[2]
    tok = load_tokenizer(MODEL)
    if damage == "wrong_id":
        r["trigger_ids"] = token_ids(tok, ["cat"])[0]
    elif damage == "text_differs":  # captions carry "cat", meta says the old word
        r["captions"] = [c.replace(r["trigger_text"], "cat", 1) for c in r["captions"]]
    elif damage == "extra_id":
        r["trigger_ids"] = r["trigger_ids"] * 2
    else:
        r["trigger_ids"] = []
    prot = write_protected(tmp_path / "P", clean, records)
    assert run_verify(clean, prot) == 1
    report = verify(clean, prot, private=prot)
    assert report.offending_ids == [r["id"]]
    kinds = {k for k, ids in report.violations.items() if ids}
    assert kinds <= {"trigger", "caption"} and kinds


def test_triggers_json_disagreeing_with_meta_fails(sets, tmp_path):
    clean, _, records = sets
    prot = write_protected(tmp_path / "P", clean, records)
    t = json.loads((prot / "triggers.json").read_text())
    t["trigger_ids"][5] = [9999]
    (prot / "triggers.json").write_text(json.dumps(t))
    assert verify(clean, prot, private=prot).violations["trigger"] == [records[5]["id"]]


def test_caption_without_trigger_prefix_fails(sets, tmp_path):
    clean, samples, records = sets
    records[6]["captions"][1] = samples[6].captions[1]  # one caption lost its trigger
    prot = write_protected(tmp_path / "P", clean, records)
    assert verify(clean, prot, private=prot).violations["caption"] == [records[6]["id"]]


def at_words(samples: list[Sample], records: list[dict]) -> list[dict]:
    """The records with each trigger before word ``i % 4`` (trigger_position: random)."""
    for i, (s, r) in enumerate(zip(samples, records, strict=True)):
        r["trigger_word"] = i % 4
        r["captions"] = [protected_caption(r["trigger_text"], c, i % 4) for c in s.captions]
    return records


@pytest.mark.parametrize(
    ("damage", "kind"),
    [
        (None, None),
        ("caption at the start", "caption"),
        ("triggers.json word", "caption"),
        ("word not an int", "caption"),
    ],
)
def test_trigger_at_a_word_position(sets, tmp_path, damage, kind):
    """Issue 11: a trigger inside the caption verifies at its word; moved or misrecorded fails."""
    clean, samples, records = sets
    records = at_words(samples, records)
    r = records[2]  # word 2: "a photo TRIGGER number 2"
    if damage == "caption at the start":
        r["captions"][0] = f"{r['trigger_text']} {samples[2].captions[0]}"
    elif damage == "word not an int":
        r["trigger_word"] = "2"
    prot = write_protected(tmp_path / "P", clean, records)
    if damage == "triggers.json word":  # captions have word 2, triggers.json says 1
        t = json.loads((prot / "triggers.json").read_text())
        t["trigger_word"][2] = 1
        (prot / "triggers.json").write_text(json.dumps(t))
    report = verify(clean, prot, private=prot)
    assert report.ok == (damage is None)
    if kind is not None:
        assert report.violations[kind] == [r["id"]]


@pytest.mark.parametrize("size", [SIZE - 2, SIZE + 1])
def test_size_mismatch_fails(sets, tmp_path, capsys, size):
    clean, _, records = sets
    r = records[1]
    r["pixels"] = np.ascontiguousarray(r["pixels"][:, :size, :size])
    if size > SIZE:
        r["pixels"] = np.pad(r["pixels"], ((0, 0), (0, 1), (0, 1)))
    prot = write_protected(tmp_path / "P", clean, records)
    assert run_verify(clean, prot) == 1
    assert r["id"] in capsys.readouterr().out
    report = verify(clean, prot, private=prot)
    assert report.violations["image"] == [r["id"]] and report.offending_ids == [r["id"]]


def test_noise_npy_mismatch_fails(sets, tmp_path):
    clean, _, records = sets
    prot = write_protected(tmp_path / "P", clean, records)
    noise = np.load(prot / "noise.npy")
    noise[4] = 0
    np.save(prot / "noise.npy", noise)
    assert verify(clean, prot, private=prot).violations["noise"] == [records[4]["id"]]


def test_unprotected_sample_must_be_clean(sets, tmp_path):
    clean, samples, records = sets
    r = records[5]
    r.update(protected=False, trigger_text="", trigger_ids=[], captions=samples[5].captions)
    prot = write_protected(tmp_path / "P", clean, records)
    assert verify(clean, prot, private=prot).violations["linf"] == [r["id"]]  # it still has noise
    r["noise"][:] = 0
    r["pixels"] = r["clean"]
    prot = write_protected(tmp_path / "P2", clean, records)
    report = verify(clean, prot, private=prot)
    assert report.ok and report.n_with_noise == len(records) - 1
    assert report.psnr.n == len(records) - 1 and math.isfinite(report.psnr.max)


def test_psnr_ssim_sane(sets, tmp_path):
    clean, _, records = sets
    prot = write_protected(tmp_path / "P", clean, records)
    noisy = verify(clean, prot, private=prot)
    # uniform integer noise in [-8, 8]: MSE ≈ (17² - 1) / 12 = 24, i.e. PSNR ≈ 34.3 dB
    assert 32 < noisy.psnr.min <= noisy.psnr.mean <= noisy.psnr.max < 37
    assert 0 < noisy.ssim.min <= noisy.ssim.max < 1
    for r in records:
        r["noise"][:] = 0
        r["pixels"] = r["clean"]
    p0 = write_protected(tmp_path / "P0", clean, records)
    same = verify(clean, p0, private=p0)
    # a set whose noise was never written protects nothing: issue 20 item 6 fails it
    assert same.max_linf == 0 and same.violations["noise"] == [r["id"] for r in records]
    assert math.isinf(same.psnr.min) and math.isinf(same.psnr.mean)
    assert same.ssim.min == pytest.approx(1.0) and same.ssim.max == pytest.approx(1.0)
    strict = json.dumps(same.to_dict(), allow_nan=False)  # the JSON report stays strict JSON
    assert json.loads(strict)["psnr"]["min"] == "inf"


def test_many_offenders_are_truncated(sets, tmp_path, capsys):
    clean, samples, records = sets
    prot = write_protected(tmp_path / "P", clean, records)
    assert run_verify(clean, prot, "--epsilon", "0") == 1
    err = capsys.readouterr().err
    assert f"FAILED for {len(samples)} ids" in err


@pytest.mark.parametrize("broken", ["clean_dir", "protected_dir", "manifest", "shards"])
def test_missing_inputs_exit_2(sets, tmp_path, capsys, broken):
    clean, _, records = sets
    prot = write_protected(tmp_path / "P", clean, records)
    if broken == "clean_dir":
        clean = tmp_path / "nowhere"
    elif broken == "protected_dir":
        prot = tmp_path / "nowhere"
    elif broken == "manifest":
        (prot / "manifest.json").unlink()
    else:
        for tar in prot.glob("train-*.tar"):
            tar.unlink()
    assert run_verify(clean, prot) == 2
    assert "mme verify:" in capsys.readouterr().err


def test_missing_epsilon_is_a_config_error(sets, tmp_path, capsys):
    clean, _, records = sets
    prot = write_protected(tmp_path / "P", clean, records)
    manifest = json.loads((prot / "manifest.json").read_text())
    del manifest["config"]["epsilon"]
    (prot / "manifest.json").write_text(json.dumps(manifest))
    private = json.loads((prot / "triggers.json").read_text())
    del private["epsilon"]  # and the run recorded none either
    (prot / "triggers.json").write_text(json.dumps(private))
    assert run_verify(clean, prot) == 2
    assert "--epsilon" in capsys.readouterr().err
    assert run_verify(clean, prot, "--epsilon", str(EPS)) == 0


@pytest.mark.parametrize("broken", ["noise_shape", "manifest_count", "triggers_json"])
def test_set_level_errors_fail(sets, tmp_path, capsys, broken):
    clean, _, records = sets
    prot = write_protected(tmp_path / "P", clean, records)
    if broken == "noise_shape":
        np.save(prot / "noise.npy", np.zeros((2, 3, SIZE, SIZE), np.int8))
    elif broken == "manifest_count":
        manifest = json.loads((prot / "manifest.json").read_text())
        manifest["splits"]["train"]["images"] += 1
        (prot / "manifest.json").write_text(json.dumps(manifest))
    else:
        (prot / "triggers.json").write_text(json.dumps({"ids": ["img000"]}))
    assert run_verify(clean, prot) == 1
    report = verify(clean, prot, private=prot)
    assert len(report.errors) == 1 and not report.offending_ids and not report.ok
    assert "error:" in report.table() and "FAILED" in capsys.readouterr().err


def test_poison_triggers_json_layouts(sets, tmp_path):
    """mme poison's triggers.json: a ``protected`` list; a trigger per row, used only where
    protected; empty trigger lists for methods without triggers."""
    clean, samples, records = sets
    r = records[2]
    r.update(protected=False, trigger_text="", trigger_ids=[], captions=samples[2].captions)
    r["noise"][:] = 0
    r["pixels"] = r["clean"]
    prot = write_protected(tmp_path / "P", clean, records)
    t = json.loads((prot / "triggers.json").read_text())
    t["protected"] = [x["protected"] for x in records]
    t["trigger_ids"][2], t["trigger_text"][2] = [1929], "dog"  # kept, but not used
    (prot / "triggers.json").write_text(json.dumps(t))
    assert verify(clean, prot, private=prot).ok
    t["protected"][4] = False  # but img004 carries noise and a trigger
    (prot / "triggers.json").write_text(json.dumps(t))
    report = verify(clean, prot, private=prot)
    assert report.offending_ids == [records[4]["id"]] == report.violations["linf"]

    for x in records:  # an untriggered method (em / random): empty trigger lists
        x.update(trigger_text="", trigger_ids=[])
        x["captions"] = samples[int(x["id"][3:])].captions
    prot = write_protected(tmp_path / "EM", clean, records)
    t = json.loads((prot / "triggers.json").read_text())
    t.update(trigger_ids=[], trigger_text=[], protected=[x["protected"] for x in records])
    (prot / "triggers.json").write_text(json.dumps(t))
    report = verify(clean, prot, private=prot)
    assert report.ok, report.table()


def test_without_private_folder_public_checks_still_run(sets, tmp_path, capsys):
    """A third party holds the clean originals and the public set only: every check but the
    noise/trigger-table ones runs, and a bad pixel is still caught."""
    clean, samples, records = sets
    pub = tmp_path / "pub"
    write_protected(pub, clean, records)
    for name in ("noise.npy", "triggers.json"):
        (pub / name).unlink()
    report = verify(clean, pub, EPS)
    assert report.ok and not report.noise_checked and report.n_checked == len(samples)
    argv = ["verify", "--clean", str(clean), "--protected", str(pub)]
    assert main([*argv, "--epsilon", str(EPS)]) == 0
    assert "no private folder" in capsys.readouterr().out
    records[2]["pixels"][0, 0, 0] ^= 0xFF  # far outside the budget
    bad = write_protected(tmp_path / "bad", clean, records)
    assert verify(clean, bad, EPS).violations["linf"] == [records[2]["id"]]


def test_parallel_verify_gives_the_same_report(sets, tmp_path, monkeypatch):
    """Pairs checked by a process pool: same counts, problems (in order) and summaries."""
    from mme.protection import verify as verify_module

    clean, samples, records = sets
    records[1]["pixels"] = np.clip(records[1]["pixels"].astype(int) + 40, 0, 255).astype(np.uint8)
    records[2]["captions"] = ["no trigger here"] * len(records[2]["captions"])
    prot = write_protected(tmp_path / "P", clean, records)
    monkeypatch.setattr(verify_module, "VERIFY_CHUNK", 2)  # several chunks from a tiny set
    one = verify_module.verify(clean, prot, EPS, workers=1).to_dict()
    many = verify_module.verify(clean, prot, EPS, workers=2).to_dict()
    assert not one["ok"] and one["n_checked"] == len(samples)
    assert one == many


def test_public_meta_naming_the_trigger_fails(sets, tmp_path):
    """The trigger, its word and the protected flag are private: a set whose public meta names
    them (made before they left it) fails the meta check, with or without the private folder."""
    clean, samples, records = sets
    records = at_words(samples, records)
    records[3]["leak"] = ("trigger_text", "trigger_ids", "trigger_word", "protected")
    prot = write_protected(tmp_path / "P", clean, records)
    for private in (prot, None):
        report = verify(clean, prot, EPS, private=private)
        assert report.violations["meta"] == report.offending_ids == [records[3]["id"]]


@pytest.mark.parametrize(
    ("damage", "kind"),
    [(None, None), ("one caption lost it", "caption"), ("two words", "trigger")],
)
def test_without_private_folder_trigger_is_read_off_the_captions(
    sets, tmp_path, capsys, damage, kind
):
    """No meta names the trigger any more: without --private verify takes the words inserted
    into the clean captions as the trigger, checks it (same place in every caption, configured
    length, tokens at that word) and says what it could not check."""
    clean, samples, records = sets
    records = at_words(samples, records)
    r = records[3]
    if damage == "one caption lost it":
        r["captions"][1] = samples[3].captions[1]
    elif damage == "two words":
        r["captions"] = [protected_caption("red dog", c, 3) for c in samples[3].captions]
    pub = write_protected(tmp_path / "pub", clean, records)
    for name in ("noise.npy", "triggers.json"):
        (pub / name).unlink()
    report = verify(clean, pub, EPS)
    assert not report.private_checked and report.ok == (damage is None), report.table()
    if kind is not None:
        assert report.violations[kind] == report.offending_ids == [r["id"]]
    assert "not checked (needs --private)" in report.table()


# -------------------------------------------- issue 20 item 6: a set that protects nothing


def test_set_whose_noise_store_was_never_written_fails(sets, tmp_path):
    """verify passed a set whose noise store was never written: every protected image equal
    to its clean source, with or without the private folder."""
    clean, _, records = sets
    for r in records:
        r["noise"][:] = 0
        r["pixels"] = r["clean"]
    prot = write_protected(tmp_path / "P", clean, records)
    with_private = verify(clean, prot, private=prot)
    assert with_private.violations["noise"] == [r["id"] for r in records]
    for name in ("noise.npy", "triggers.json"):
        (prot / name).unlink()
    public_only = verify(clean, prot, EPS)  # the captions still carry their triggers
    assert public_only.violations["noise"] == [r["id"] for r in records]
    assert any("protects nothing" in e for e in public_only.errors) and not public_only.ok


def test_protected_sample_without_a_trigger_fails(sets, tmp_path):
    """verify passed a protected sample whose trigger_ids were empty."""
    clean, samples, records = sets
    r = records[2]
    r.update(trigger_text="", trigger_ids=[], captions=samples[2].captions)
    prot = write_protected(tmp_path / "P", clean, records)
    report = verify(clean, prot, private=prot)
    assert report.violations["trigger"] == [r["id"]] == report.offending_ids


def test_edited_manifest_cannot_raise_its_own_bound(sets, tmp_path, capsys):
    """verify took ε from the manifest it was checking: an edited manifest raised its own
    bound and a set with 4x the noise passed."""
    clean, _, records = sets
    for r in records:
        r["noise"] = (r["noise"].astype(np.int16) * 4).clip(-32, 32).astype(np.int8)
        r["pixels"] = apply_noise(r["clean"], r["noise"])
    prot = write_protected(tmp_path / "P", clean, records, eps=32)  # the set claims 32
    recorded = json.loads((prot / "triggers.json").read_text())
    recorded["epsilon"] = EPS  # what the run was made with (its private record)
    (prot / "triggers.json").write_text(json.dumps(recorded))
    report = verify(clean, prot, private=prot)
    assert report.epsilon == EPS and not report.ok and report.violations["linf"]
    assert any("claims epsilon 32" in e for e in report.errors)
    argv = ["verify", "--clean", str(clean), "--protected", str(prot)]
    assert main(argv) == 2  # no bound of its own: the set's claim alone is not enough
    assert "--epsilon" in capsys.readouterr().err
    assert main([*argv, "--epsilon", str(EPS)]) == 1
