"""`mme poison` end to end on a tiny synthetic set: outputs, budget, triggers, resume, errors."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from mme import cli, imageops, shards
from mme.config import ConfigError, DataConfig, PoisonConfig
from mme.ingest.prepare import prepare
from mme.protection.poison import poison


@pytest.fixture(scope="module")
def fast(tiny_poison: dict) -> dict:
    """This file's runs: the shared tiny settings with 2 surrogate and 2 PGD steps a round."""
    return tiny_poison | {"surrogate_steps": 2, "pgd_steps": 2}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    prepare(DataConfig(source="synthetic", out=out, n_train=16, n_test=4, image_size=64))
    return out


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch):
    monkeypatch.setenv("MME_TRACKING", "off")


def tar_bytes(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in shards.shard_paths(folder, "train")]


def test_mem_outputs_are_within_budget_and_carry_triggers(clean, tmp_path, fast):
    cfg = PoisonConfig(clean=clean, out=tmp_path / "mem", private=tmp_path / "priv", **fast)
    manifest = poison(cfg)
    out, private = cfg.out, cfg.private
    assert {p.name for p in out.iterdir()} == {".mme-owner", "manifest.json", "train-000000.tar"}
    assert {p.name for p in private.iterdir()} == {
        ".mme-owner",
        "noise.npy",
        "triggers.json",
        "grid.png",
    }  # work files removed after success
    noise = np.load(private / "noise.npy")
    assert noise.dtype == np.int8 and noise.shape == (16, 3, 64, 64)
    assert np.abs(noise).max() <= 8 and np.abs(noise).max() > 0
    tok = open_clip.get_tokenizer("mme-tiny-vit")
    clean_samples = {s.id: s for s in shards.iter_samples(clean, "train")}
    triggers = json.loads((private / "triggers.json").read_text())  # private: not in the meta
    for i, s in enumerate(shards.iter_samples(out, "train")):
        c = clean_samples[s.id]
        base = imageops.to_working_resolution(c.image_bytes, 64)
        prot = s.image().transpose(2, 0, 1)
        assert np.array_equal(prot, imageops.apply_noise(base, noise[i]))
        assert triggers["ids"][i] == s.id and not set(shards.PRIVATE_META) & set(s.meta)
        trig, ids = triggers["trigger_text"][i], triggers["trigger_ids"][i]
        assert len(ids) == 3 and tok.encode(trig) == ids
        assert s.captions == [f"{trig} {cap}" for cap in c.captions]
    assert manifest["n_protected"] == 16 and len(manifest["rounds"]) == 2
    assert manifest["verify"]["ok"] and manifest["verify"]["max_linf"] <= 8
    argv = ["verify", "--clean", str(clean), "--protected", str(out), "--private", str(private)]
    assert cli.main(argv) == 0
    # settings added later are left out at their defaults: the manifest keeps its bytes
    assert not {"trigger_position", "trigger_vocab"} & set(manifest["config"])
    assert "trigger_word" not in json.loads((private / "triggers.json").read_text())


def test_random_trigger_positions_verify_and_survive_strip_trigger(clean, tmp_path, fast):
    """Issue 11: `strip-trigger` removed every MEM trigger (always the first words). At a
    random word position per image (natural words from the captions) most triggers stay."""
    from mme.config import AttackConfig
    from mme.countermeasures.apply import attack
    from mme.protection.methods.triggers import protected_caption

    cfg = PoisonConfig(
        clean=clean,
        out=tmp_path / "mem",
        private=tmp_path / "priv",
        trigger_position="random",
        trigger_vocab="words",
        **fast,
    )
    manifest = poison(cfg)
    assert manifest["verify"]["ok"]
    assert manifest["config"]["trigger_position"] == manifest["trigger_position"] == "random"
    argv = ["verify", "--clean", str(clean), "--protected", str(cfg.out)]
    assert cli.main([*argv, "--private", str(cfg.private)]) == 0
    recorded = json.loads((cfg.private / "triggers.json").read_text())
    clean_samples = {s.id: s for s in shards.iter_samples(clean, "train")}
    caption_words = {
        w
        for s in clean_samples.values()
        for c in s.captions
        for w in re.findall("[a-z]+", c.lower())
    }
    words, triggers = [], {}
    for i, s in enumerate(shards.iter_samples(cfg.out, "train")):
        assert recorded["ids"][i] == s.id and not set(shards.PRIVATE_META) & set(s.meta)
        word, trig = recorded["trigger_word"][i], recorded["trigger_text"][i]
        assert s.captions == [
            protected_caption(trig, c, word) for c in clean_samples[s.id].captions
        ]
        assert all(len(w) >= 3 and w in caption_words for w in trig.split())  # trigger_vocab
        words.append(word)
        triggers[s.id] = trig
    assert len(set(words)) >= 3  # varied positions, not always the first words
    out = tmp_path / "stripped"
    assert (
        attack(AttackConfig(protected=cfg.out, out=out, transform="strip-trigger:3"))[
            "trigger_position"
        ]
        == "random"
    )
    kept = [
        f" {triggers[s.id]} " in f" {c} "
        for s in shards.iter_samples(out, "train")
        for c in s.captions
    ]
    assert sum(kept) > 0.5 * len(kept)


def test_a_last_batch_of_one_image_still_gets_noise(clean, tmp_path, fast):
    """Regression: 16 images in batches of 5 left one image alone; its ClipLoss was 0, so after
    one round its noise was still all zero."""
    fast = fast | {"rounds": 1, "batch_size": 5}
    poison(PoisonConfig(clean=clean, out=tmp_path / "mem", private=tmp_path / "p", **fast))
    noise = np.load(tmp_path / "p" / "noise.npy")
    assert (np.abs(noise).reshape(len(noise), -1).max(axis=1) > 0).all()


@pytest.mark.parametrize("method", ["random", "em", "errmax"])
def test_baselines_have_no_trigger_and_respect_budget(clean, tmp_path, method, fast):
    cfg = PoisonConfig(
        clean=clean, out=tmp_path / method, private=tmp_path / "p", method=method, epsilon=4, **fast
    )
    poison(cfg)
    noise = np.load(cfg.private / "noise.npy")
    assert 0 < np.abs(noise).max() <= 4
    clean_caps = {s.id: s.captions for s in shards.iter_samples(clean, "train")}
    for s in shards.iter_samples(cfg.out, "train"):
        assert s.captions == clean_caps[s.id] and not set(shards.PRIVATE_META) & set(s.meta)


def test_partial_protection_leaves_the_rest_untouched(clean, tmp_path, fast):
    cfg = PoisonConfig(
        clean=clean, out=tmp_path / "half", private=tmp_path / "p", protect_fraction=0.5, **fast
    )
    manifest = poison(cfg)
    assert manifest["n_protected"] == 8
    noise = np.load(cfg.private / "noise.npy")
    flags = json.loads((cfg.private / "triggers.json").read_text())["protected"]
    for row, flag in zip(noise, flags, strict=True):
        assert (np.abs(row).max() > 0) == flag
    clean_caps = {s.id: s.captions for s in shards.iter_samples(clean, "train")}
    for s, flag in zip(shards.iter_samples(cfg.out, "train"), flags, strict=True):
        assert (s.captions != clean_caps[s.id]) == flag  # only the protected carry a trigger
        assert not set(shards.PRIVATE_META) & set(s.meta)  # which ones: private


def test_a_lone_protected_image_is_optimised_against_a_negative(clean, tmp_path, fast):
    """1 of 16 protected: its batch of one pair would have a contrastive loss of 0 (noise and
    trigger frozen); it gets an unprotected image as a negative, which is not changed."""
    cfg = PoisonConfig(
        clean=clean, out=tmp_path / "o", private=tmp_path / "p", protect_fraction=0.05, **fast
    )
    assert poison(cfg)["n_protected"] == 1
    noise = np.load(cfg.private / "noise.npy")
    flags = json.loads((cfg.private / "triggers.json").read_text())["protected"]
    moved = np.abs(noise).reshape(len(noise), -1).max(axis=1) > 0
    assert moved.tolist() == flags and sum(flags) == 1


def test_a_train_split_of_one_image_is_refused_for_contrastive_methods(tmp_path, fast):
    one = tmp_path / "one"
    prepare(DataConfig(source="synthetic", out=one, n_train=1, n_test=1, image_size=64))
    cfg = PoisonConfig(clean=one, out=tmp_path / "o", private=tmp_path / "p", **fast)
    with pytest.raises(ConfigError, match="has 1 image; poison.method = mem needs at least 2"):
        poison(cfg)
    assert not (tmp_path / "o").exists()


class Killed(Exception):
    pass


def test_killed_and_resumed_run_gives_identical_shards(clean, tmp_path, fast):
    kw = {**fast, "rounds": 3, "trigger_rounds": 2}
    full = PoisonConfig(clean=clean, out=tmp_path / "full", private=tmp_path / "pf", **kw)
    poison(full)

    cut = PoisonConfig(clean=clean, out=tmp_path / "cut", private=tmp_path / "pc", **kw)

    def kill(r, stats):
        if r == 1:
            raise Killed

    with pytest.raises(Killed):
        poison(cut, on_round=kill)
    assert not (cut.out / "manifest.json").exists()
    poison(cut, resume=True)
    assert tar_bytes(cut.out) == tar_bytes(full.out)
    assert np.array_equal(np.load(cut.private / "noise.npy"), np.load(full.private / "noise.npy"))
    # the description too (no wall times in it), so the dataset version is the same
    manifests = [json.loads((c.out / "manifest.json").read_text()) for c in (cut, full)]
    assert all("out" not in m["config"] for m in manifests)  # no local path (issue 20)
    assert manifests[0] == manifests[1]
    assert "seconds" not in json.dumps(manifests[0])


def test_protected_bytes_do_not_depend_on_the_thread_count(clean, tmp_path, fast):
    """Issue 14: two machines (or OMP_NUM_THREADS) with other thread counts gave other bytes:
    CPU kernels split reductions per thread. The loop runs at ``poison.threads`` regardless."""
    cfg = PoisonConfig(
        clean=clean,
        out=tmp_path / "mem",
        private=tmp_path / "private",
        **{**fast, "surrogate_steps": 4},
    )
    before = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 3):  # what the process was started with (OMP_NUM_THREADS, cores)
            torch.set_num_threads(n)
            poison(cfg)
            assert torch.get_num_threads() == n  # restored after the loop
            files = sorted([*cfg.out.iterdir(), *cfg.private.iterdir()])  # noise.npy included
            outputs.append({f"{p.parent.name}/{p.name}": p.read_bytes() for p in files})
    finally:
        torch.set_num_threads(before)
    assert list(outputs[0]) == list(outputs[1])
    for name, data in outputs[0].items():
        assert data == outputs[1][name], name


def poison_subprocess(clean: Path, out: Path, isa: str, **env: str) -> dict[str, bytes]:
    """``python -m mme poison`` (a tiny run) in a fresh process with ``env`` set outside it;
    returns every output file but the manifest (it names the output folder)."""
    from mme import cpuisa

    base = {k: v for k, v in os.environ.items() if k not in cpuisa.PINS["avx2"]}
    repo = str(Path(__file__).resolve().parents[1])
    base |= {"MME_TRACKING": "off", "OMP_NUM_THREADS": "1", "PYTHONPATH": repo, **env}
    flags = "--params none --model mme-tiny-vit --rounds 2 --surrogate-steps 4 --batch-size 8"
    flags += " --trigger-rounds 1 --candidates 2 --pgd-steps 2 --device cpu --grid-samples 2"
    flags += f" --write-workers 1 --cpu-isa {isa}"
    argv = [sys.executable, "-m", "mme", "poison", *flags.split(), "--clean", str(clean)]
    argv += ["--out", str(out / "mem"), "--private", str(out / "private")]
    proc = subprocess.run(argv, env=base, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted([*(out / "mem").iterdir(), *(out / "private").iterdir()])
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in files if p.suffix != ".json"}


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="poison.cpu_isa avx2 needs an x86-64 CPU with AVX2 (this one has none)",
)
def test_protected_bytes_do_not_depend_on_the_cpu_instruction_set(clean, tmp_path):
    """Issue 14: machines with other instruction sets (AVX-512 vs AVX2 kernels) gave other bytes.
    Simulated by forcing ATen's kernels outside mme; ``poison.cpu_isa: avx2`` pins them back."""
    pinned = [
        poison_subprocess(clean, tmp_path / f"pin-{c}", "avx2", ATEN_CPU_CAPABILITY=c)
        for c in ("avx512", "default")  # an AVX-512 machine; the plainest x86-64 kernels
    ]
    native = poison_subprocess(clean, tmp_path / "native", "native", ATEN_CPU_CAPABILITY="default")
    assert list(pinned[0]) == list(pinned[1]) == list(native)
    for name, data in pinned[0].items():
        assert data == pinned[1][name], name
    assert native["private/noise.npy"] != pinned[0]["private/noise.npy"]  # the pin did something


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="poison.cpu_isa avx2 needs an x86-64 CPU with AVX2 (this one has none)",
)
def test_the_python_api_pins_before_torch_loads():
    """``mme.poison`` / ``mme.protect`` looked up before torch is imported pin the default level."""
    from mme import cpuisa

    env = {k: v for k, v in os.environ.items() if k not in cpuisa.PINS["avx2"]}
    code = "import mme; mme.protect; import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "AVX2", out.stderr[-2000:]


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--epsilon", "0"], "poison.epsilon = '0'"),
        (["--epsilon", "300"], "poison.epsilon = '300'"),
        (["--trigger-len", "0"], "poison.trigger_len = '0'"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--method", "magic"], "poison.method = 'magic'"),
    ],
)
def test_bad_params_fail_before_work(clean, tmp_path, capsys, flags, needle):
    argv = ["poison", "--clean", str(clean), "--out", str(tmp_path / "x")]
    argv += ["--private", str(tmp_path / "px"), *flags]
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_empty_or_missing_dataset_fails_clearly(tmp_path, fast):
    with pytest.raises(ConfigError, match="not found"):
        poison(PoisonConfig(clean=tmp_path / "nothing", out=tmp_path / "o", **fast))
    assert not (tmp_path / "o").exists()
    empty = tmp_path / "empty"
    shards.write_json_atomic(
        empty / "manifest.json", {"splits": {"train": {"images": 0}, "test": {"images": 0}}}
    )
    with pytest.raises(ConfigError, match="no images"):
        poison(PoisonConfig(clean=empty, out=tmp_path / "o", **fast))


def test_poison_is_tracked_in_mlflow(clean, tmp_path, monkeypatch, fast):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MME_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = PoisonConfig(clean=clean, out=tmp_path / "tracked", private=tmp_path / "p", **fast)
    poison(cfg)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (run,) = [r for r in runs if r.info.run_name == "poison-mem"]
    assert run.data.params["method"] == "mem" and run.data.params["trigger_len"] == "3"
    assert run.data.params["epsilon"] == "8.0"
    # the clean input's version, the same value its victim's train run logs
    assert run.data.params["data_manifest_sha256"] == shards.manifest_sha256(clean)
    assert {"surrogate_loss", "mean_abs_noise_px", "verify_ok"} <= set(run.data.metrics)
    assert {"seconds_generation", "seconds_total"} <= set(run.data.metrics)
    client = mlflow.MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"grid.png", "manifest.json", "triggers.json"} <= names


@pytest.mark.parametrize("n", [1, 64, 150])
def test_parallel_png_encoding_is_byte_identical(tmp_path, n):
    """write_outputs' process pool gives the same bytes, in the same order, as one process."""
    from mme.protection.methods.store import PairStore
    from mme.protection.pools import protected_pngs

    clean, noise = PairStore.open_arrays(tmp_path, n, 16, np.dtype(np.int8))
    rng = np.random.default_rng(n)
    clean[:] = rng.integers(0, 256, clean.shape, dtype=np.uint8)
    noise[0][:] = rng.integers(-8, 9, clean.shape, dtype=np.int8)  # written, not yet flushed
    one = list(protected_pngs(clean, noise[0], workers=1))
    many = list(protected_pngs(clean, noise[0], workers=3))
    assert len(one) == n and one == many
    assert one[-1] == shards.encode_png(
        imageops.apply_noise(clean[-1], noise[0][-1]).transpose(1, 2, 0)
    )


def test_protected_set_does_not_depend_on_write_workers(clean, tmp_path, fast):
    fast = fast | {"rounds": 1, "method": "random", "noise_seed": 7}  # else from the OS
    a = poison(
        PoisonConfig(
            clean=clean, out=tmp_path / "a", private=tmp_path / "pa", write_workers=1, **fast
        )
    )
    poison(
        PoisonConfig(
            clean=clean,
            out=tmp_path / "b",
            private=tmp_path / "pb",
            write_workers=2,
            shard_size=5,
            **fast,
        )
    )
    c = poison(
        PoisonConfig(
            clean=clean, out=tmp_path / "c", private=tmp_path / "pc", write_workers=2, **fast
        )
    )
    assert tar_bytes(tmp_path / "a") == tar_bytes(tmp_path / "c")
    assert len(tar_bytes(tmp_path / "b")) == 4
    assert a["splits"] == c["splits"] and "write_workers" not in a["config"]
    assert "out" not in a["config"] and a == c  # no local path in the manifest (issue 20)
