"""The typed manifest: one reader/writer, one trigger length, hostile files rejected clearly."""

from __future__ import annotations

import json

import pytest

from mme.config import ConfigError, DataConfig, PoisonConfig
from mme.manifest import Manifest, read_manifest, write_manifest


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"method": "random", "trigger_len": 0, "config": {"trigger_len": 3}}, 0),  # old baseline
        ({"method": "em", "config": {"method": "em", "trigger_len": 3}}, 0),
        ({"method": "mem", "trigger_len": 5, "config": {"trigger_len": 5}}, 5),
        ({"config": {"method": "mem", "trigger_len": 1}}, 1),  # hand-made: config only
        ({"poison": {"method": "mem", "epsilon": 8}}, None),  # older record, no length
        ({"created_by": "mme prepare", "config": {"source": "folder"}}, None),  # clean
    ],
)
def test_one_trigger_len(raw, expected):
    assert Manifest.model_validate(raw).trigger_len == expected


def test_data_record_of_clean_and_protected():
    clean = {"method": "clean", "epsilon": None, "trigger_len": None, "attack": None}
    assert Manifest().data_record() == clean
    m = Manifest.model_validate({"method": "mem", "epsilon": 8, "trigger_len": 3})
    assert m.data_record() == {"method": "mem", "epsilon": 8, "trigger_len": 3, "attack": None}
    attacked = Manifest.model_validate({"method": "mem", "trigger_len": 3, "attack": "jpeg:90"})
    assert attacked.data_record()["attack"] == "jpeg:90"


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2]",
        '{"splits": {"train": {"images": -1}}}',
        '{"trigger_position": "middle"}',
    ],
)
def test_malformed_manifest_is_a_one_line_config_error(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ConfigError) as err:
        read_manifest(tmp_path)
    assert "not a valid manifest" in str(err.value) and "\n" not in str(err.value)


def test_write_keeps_the_bytes_of_the_dict(tmp_path):
    raw = {"created_by": "x", "splits": {"train": {"images": 1, "captions": 2, "shards": []}}}
    write_manifest(tmp_path, raw)
    assert json.loads((tmp_path / "manifest.json").read_text()) == raw
    assert read_manifest(tmp_path).images("train") == 1 and read_manifest(tmp_path).images("x") == 0


def test_a_baseline_writes_a_single_trigger_len(tmp_path, monkeypatch, tiny_poison):
    from mme.ingest.prepare import prepare
    from mme.protection.poison import poison

    monkeypatch.setenv("MME_TRACKING", "off")
    clean = tmp_path / "clean"
    prepare(DataConfig(source="synthetic", out=clean, n_train=4, n_test=1, image_size=32))
    cfg = PoisonConfig(
        clean=clean,
        out=tmp_path / "r",
        private=tmp_path / "p",
        **tiny_poison | {"method": "random"},
    )
    poison(cfg)
    raw = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert raw["trigger_len"] == 0 and "trigger_len" not in raw["config"]
    assert read_manifest(tmp_path / "r").trigger_len == 0


def _records(*shas: str) -> dict:
    shards = [{"name": f"train-{i:06d}.tar", "count": 1, "sha256": s} for i, s in enumerate(shas)]
    return {"splits": {"train": {"images": len(shas), "captions": 1, "shards": shards}}}


def test_data_version_is_the_recorded_shards_only(tmp_path):
    """Issue 22: the dataset version hashed the whole manifest, paths included, so DVC's
    data/protected/mem and the Prefect pipeline's runs/prefect/... got two ids for one set."""
    from mme.shards import manifest_sha256

    a, b, c = (tmp_path / n for n in "abc")
    assert manifest_sha256(a) is None
    write_manifest(a, _records("1" * 64) | {"config": {"out": str(a)}})
    write_manifest(b, _records("1" * 64) | {"config": {"out": str(b)}, "created_by": "y"})
    write_manifest(c, _records("2" * 64) | {"config": {"out": str(a)}})
    assert manifest_sha256(a) == manifest_sha256(b) != manifest_sha256(c)
    assert len(manifest_sha256(a)) == 64


@pytest.mark.parametrize(
    "splits",
    [[], {"train": []}, {"train": {"shards": {}}}, {"train": {"shards": [{"name": 1}]}}],
)
def test_data_version_of_a_malformed_manifest_is_an_error(tmp_path, splits):
    from mme.shards import BadShard, manifest_sha256

    (tmp_path / "manifest.json").write_text(json.dumps({"splits": splits}))
    with pytest.raises(BadShard, match="manifest.json"):
        manifest_sha256(tmp_path)


def test_same_bytes_in_two_folders_are_one_dataset_version(tmp_path, monkeypatch, tiny_poison):
    """prepare and poison into two folders each (as DVC and the Prefect pipeline do): the clean
    manifests name their folders, the shards are the same bytes, so the version is one."""
    from mme.ingest.prepare import prepare
    from mme.protection.poison import poison
    from mme.shards import manifest_sha256

    monkeypatch.setenv("MME_TRACKING", "off")
    for name in ("dvc", "prefect"):
        root = tmp_path / name
        prepare(
            DataConfig(source="synthetic", out=root / "clean", n_train=8, n_test=2, image_size=32)
        )
        cfg = PoisonConfig(
            clean=root / "clean", out=root / "prot", private=root / "priv", **tiny_poison
        )
        poison(cfg)
    for folder in ("clean", "prot"):
        dvc, prefect = tmp_path / "dvc" / folder, tmp_path / "prefect" / folder
        mine, theirs = (
            (dvc / "manifest.json").read_bytes(),
            (prefect / "manifest.json").read_bytes(),
        )
        # the clean manifests name their folders (private); the public one names no path
        assert (mine != theirs) if folder == "clean" else (mine == theirs)
        for tar in sorted(dvc.glob("*.tar")):
            assert tar.read_bytes() == (prefect / tar.name).read_bytes(), tar.name
        assert manifest_sha256(dvc) == manifest_sha256(prefect) is not None
