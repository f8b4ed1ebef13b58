"""Issue 20, safety round 2: every output owned, every input contained, nothing published that
helps undo the protection. One test per case, named after it (each failed before its fix);
``test_every_writing_command_refuses_another_commands_folder`` runs every writing command
against a folder made by every other one and checks it refuses without touching it."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mme import cli, guard, shards
from mme.config import DataConfig, PoisonConfig
from mme.ingest.prepare import prepare
from mme.protection.export import export
from mme.protection.poison import poison

TINY_ARGS = ["--model", "mme-tiny-vit", "--rounds", "1", "--surrogate-steps", "1"]
TINY_ARGS += ["--pgd-steps", "1", "--trigger-rounds", "1", "--candidates", "2"]
TINY_ARGS += ["--batch-size", "8", "--device", "cpu"]
METRICS = {f"{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
METRICS |= {"rsum": 6.0, "rsum_over_chance": 1.0, "chance_rsum": 6.0}


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch):
    monkeypatch.setenv("MME_TRACKING", "off")


@pytest.fixture
def alarm():
    """Fail (SIGALRM) instead of hanging the suite if a read blocks."""
    signal.alarm(60)
    yield
    signal.alarm(0)


def png(rgb=(200, 30, 30), size: int = 32) -> bytes:
    return shards.encode_png(np.full((size, size, 3), rgb, np.uint8))


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_poison) -> dict[str, Path]:
    """One folder made by each writing command (train's and protect's by their guard claim,
    which is what those commands write before any work), plus a user's folder."""
    root = tmp_path_factory.mktemp("made")
    clean = root / "clean"
    prepare(DataConfig(source="synthetic", out=clean, n_train=8, n_test=4, image_size=32))
    cfg = PoisonConfig(clean=clean, out=root / "pub", private=root / "priv", **tiny_poison)
    poison(cfg)
    export(cfg.out, root / "export")
    argv = ["attack", "--params", "none", "--protected", str(cfg.out), "--out", str(root / "att")]
    assert cli.main(argv) == 0
    (root / "m.json").write_text(json.dumps(METRICS))
    argv = ["report", "--metrics", str(root / "m.json"), "--recall-dir", str(root / "recall")]
    assert cli.main([*argv, "--out", str(root / "table.md")]) == 0
    with guard.claim("mme train", [guard.Folder(root / "run", "run")], {}):
        (root / "run" / "checkpoint.pt").write_bytes(b"weights")
    outs = [guard.Folder(root / "prot", needs_force=True)]
    outs.append(guard.Folder(root / "prot.private", "private", tied_to=root / "prot"))
    with guard.claim("mme protect", outs, {}):
        (root / "prot" / "photo.png").write_bytes(png())
        (root / "prot.private" / "protect.json").write_text("{}")
    user = root / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    (root / "ckpt.pt").write_bytes(b"not a checkpoint")
    return {
        "root": root,
        "clean": clean,
        "pub": cfg.out,
        "priv": cfg.private,
        "export": root / "export",
        "att": root / "att",
        "run": root / "run",
        "recall": root / "recall",
        "prot": root / "prot",
        "prot.private": root / "prot.private",
        "user": user,
    }


# target folder -> the (command, role) that made it
MAKERS = {
    "clean": ("mme prepare", "out"),
    "pub": ("mme poison", "public"),
    "priv": ("mme poison", "private"),
    "export": ("mme export", "out"),
    "att": ("mme attack", "out"),
    "run": ("mme train", "run"),
    "recall": ("mme report", "recall"),
    "prot": ("mme protect", "out"),
    "prot.private": ("mme protect", "private"),
    "user": (None, None),
}


def writers(m: dict[str, Path]) -> dict[tuple[str, str], object]:
    """(command, role) -> argv given the target folder ``t`` (fresh paths for the rest)."""
    fresh = m["root"] / "fresh"
    first = lambda t: sorted(p for p in t.iterdir() if p.is_file())[0]  # noqa: E731
    poison_args = ["poison", "--params", "none", "--clean", str(m["clean"]), *TINY_ARGS]
    return {
        ("mme prepare", "out"): lambda t: ["prepare", "--params", "none", "--out", str(t)],
        ("mme poison", "public"): lambda t: [
            *poison_args, "--out", str(t), "--private", str(fresh / "p")
        ],
        ("mme poison", "private"): lambda t: [
            *poison_args, "--out", str(fresh / "o"), "--private", str(t)
        ],
        ("mme export", "out"): lambda t: [
            "export", "--protected", str(m["pub"]), "--out", str(t), "--force"
        ],
        ("mme attack", "out"): lambda t: [
            "attack", "--params", "none", "--protected", str(m["pub"]), "--out", str(t)
        ],
        ("mme train", "run"): lambda t: [
            "train", "--params", "none", "--shards", str(m["clean"]), "--run-dir", str(t)
        ],
        ("mme evaluate", "file"): lambda t: [
            "evaluate", "--params", "none", "--checkpoint", str(m["root"] / "ckpt.pt"),
            "--shards", str(m["clean"]), "--out", str(first(t)),
        ],
        ("mme verify", "file"): lambda t: [
            "verify", "--clean", str(m["clean"]), "--protected", str(m["pub"]),
            "--private", str(m["priv"]), "--json", str(first(t)),
        ],
        ("mme report", "recall"): lambda t: [
            "report", "--metrics", str(m["root"] / "m.json"), "--recall-dir", str(t)
        ],
        ("mme report", "file"): lambda t: [
            "report", "--metrics", str(m["root"] / "m.json"), "--out", str(first(t))
        ],
        ("mme protect", "out"): lambda t: ["protect", str(m["export"]), str(t), "--force"],
        ("mme protect", "private"): lambda t: [
            "protect", str(m["export"]), str(fresh / "x"), "--private", str(t), "--force"
        ],
    }  # fmt: skip


def test_every_writing_command_refuses_another_commands_folder(made, capsys):
    """prepare, poison (public and private), protect (output and private), export, attack,
    train, evaluate, report (and verify's --json), each pointed at a folder (or a file in it)
    that another command made or a user owns: exit 2, one line, and the folder is byte for byte
    as it was."""
    refused = 0
    for (command, role), argv in writers(made).items():
        for name, maker in MAKERS.items():
            if maker == (command, role):
                continue  # its own output: replacing that is allowed
            target = made[name]
            before = files_under(target)
            assert cli.main(argv(target)) == 2, (command, role, name)
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"{command}:"), (command, name, err)
            assert files_under(target) == before, (command, role, name)
            refused += 1
    assert refused == 12 * 10 - 9
    assert not (made["root"] / "fresh").exists()  # nothing was started elsewhere either


# ------------------------------------------------------------------ 1. every output owned


def test_attack_onto_a_prepare_output_keeps_the_clean_set(made, capsys):
    """`mme attack --protected P --out C`, C a prepare output, replaced C's train-000000.tar
    and manifest.json: the clean originals were gone."""
    before = files_under(made["clean"])
    argv = ["attack", "--params", "none", "--protected", str(made["pub"])]
    assert cli.main([*argv, "--out", str(made["clean"])]) == 2
    assert "`mme prepare` made it" in capsys.readouterr().err
    assert files_under(made["clean"]) == before


def test_second_poison_with_the_default_private_folder_keeps_the_first_runs_noise(
    made, tmp_path, monkeypatch, tiny_poison
):
    """Two `mme poison` runs with different --out and the default private folder: the second
    overwrote the first one's noise.npy and triggers.json."""
    monkeypatch.chdir(tmp_path)
    run = dict(clean=made["clean"], **tiny_poison | {"method": "random", "rounds": 1})
    first = PoisonConfig(out=Path("data/protected/one"), **run)
    poison(first)
    noise = (first.private / "noise.npy").read_bytes()
    second = PoisonConfig(out=Path("data/protected/two"), **run)
    assert second.private != first.private  # the default follows --out
    poison(second)
    assert (first.private / "noise.npy").read_bytes() == noise
    with pytest.raises(guard.OutputRefused, match="holds the private files of"):
        poison(PoisonConfig(out=Path("data/protected/three"), private=first.private, **run))
    assert (first.private / "noise.npy").read_bytes() == noise


def test_poison_out_onto_an_earlier_runs_private_folder_is_refused(made, tiny_poison):
    """`mme poison --out` at an earlier run's private folder passed the ownership check (both
    "mme poison") and deleted its noise."""
    before = files_under(made["priv"])
    cfg = PoisonConfig(clean=made["clean"], out=made["priv"], private=made["root"] / "p2")
    with pytest.raises(guard.OutputRefused, match="private folder"):
        poison(cfg.model_copy(update=tiny_poison))
    assert files_under(made["priv"]) == before


def test_train_into_a_folder_it_did_not_make_deletes_nothing(made, tmp_path, capsys):
    """`mme train --run-dir D` deleted D/pairs/, D/trainer/ and D/checkpoint.pt whatever made
    them."""
    d = tmp_path / "D"
    for name in ("pairs", "trainer"):
        (d / name).mkdir(parents=True)
        (d / name / "keep.txt").write_text(name)
    (d / "checkpoint.pt").write_bytes(b"someone's model")
    (d / "notes.md").write_text("mine")
    before = files_under(d)
    argv = ["train", "--params", "none", "--shards", str(made["clean"]), "--run-dir", str(d)]
    assert cli.main(argv) == 2
    assert "not made by `mme train`" in capsys.readouterr().err
    assert files_under(d) == before


def test_evaluate_out_onto_its_checkpoint_keeps_the_checkpoint(made, tmp_path, capsys):
    """`mme evaluate --checkpoint X --out X` overwrote the checkpoint with JSON."""
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"weights")
    argv = ["evaluate", "--params", "none", "--checkpoint", str(ckpt)]
    assert cli.main([*argv, "--shards", str(made["clean"]), "--out", str(ckpt)]) == 2
    assert "is the checkpoint" in capsys.readouterr().err
    assert ckpt.read_bytes() == b"weights"


def test_protect_force_onto_a_user_folder_refuses_before_any_work(made, tmp_path, capsys):
    """`mme protect IN OUT --force` on a user's folder ran the whole pipeline, then failed at
    export with a traceback."""
    out = made["user"]
    before = files_under(out)
    assert cli.main(["protect", str(made["export"]), str(out), "--force", *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no mme command made it" in err[0]
    assert files_under(out) == before and not (out.parent / "user.private").exists()


# ---------------------------------------------------------------- 2. every input contained


def csv_corpus(tmp_path: Path) -> tuple[Path, Path]:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "in.png").write_bytes(png((10, 200, 10)))
    (elsewhere / "secret.png").write_bytes(png((1, 2, 3)))
    rows = ["images,caption", "in.png,a green square", f"{elsewhere / 'secret.png'},a secret"]
    rows.append("../elsewhere/secret.png,the secret again")
    (root / "c.csv").write_text("\n".join(rows) + "\n")
    return root, elsewhere


def test_absolute_csv_path_outside_the_image_root_is_not_read(tmp_path):
    """An absolute image path in a CSV was read even with --image-root set: `mme protect`
    would publish any readable image on the machine."""
    root, _ = csv_corpus(tmp_path)
    kw = dict(source="csv", csv=root / "c.csv", image_root=root)
    manifest = prepare(DataConfig(out=tmp_path / "out", **kw))
    assert manifest["splits"]["train"]["images"] == 1
    assert manifest["skipped_counts"] == {"outside_root": 2}
    allowed = prepare(DataConfig(out=tmp_path / "out2", allow_absolute_paths=True, **kw))
    assert allowed["splits"]["train"]["images"] == 2  # the absolute one, by the explicit flag
    assert allowed["skipped_counts"] == {"outside_root": 1}  # ../ stays refused


def test_symlinked_parquet_leaving_the_hf_input_is_not_followed(tmp_path):
    """The HF source followed a symlinked train-0.parquet out of its input."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    outside = tmp_path / "outside.parquet"
    table = pa.table({"image": [png()], "text": ["a secret square"]})
    pq.write_table(table, outside)
    inp = tmp_path / "hf"
    inp.mkdir()
    pq.write_table(pa.table({"image": [png((5, 5, 200))], "text": ["blue"]}), inp / "a.parquet")
    (inp / "train-0.parquet").symlink_to(outside)
    manifest = prepare(DataConfig(source="hf", input=inp, out=tmp_path / "out"))
    assert manifest["skipped_counts"] == {"not_regular_file": 1}
    assert manifest["splits"]["train"]["images"] == 1


def test_fifo_named_parquet_does_not_hang_the_hf_source(tmp_path, alarm):
    """The HF source hung on a FIFO (no read_regular)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    inp = tmp_path / "hf"
    inp.mkdir()
    pq.write_table(pa.table({"image": [png()], "text": ["red"]}), inp / "a.parquet")
    os.mkfifo(inp / "b.parquet")
    manifest = prepare(DataConfig(source="hf", input=inp, out=tmp_path / "out"))
    assert manifest["skipped_counts"] == {"not_regular_file": 1}


def test_images_checked_out_from_a_dvc_symlink_cache_are_ingested(tmp_path):
    """Symlinked images were refused (not_regular_file): a folder checked out from a DVC cache
    with cache.type symlink could not be ingested at all."""
    repo = tmp_path / "repo"
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    cache.mkdir(parents=True)
    data = repo / "data" / "photos"
    data.mkdir(parents=True)
    for i, rgb in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        (cache / f"{i:032x}").write_bytes(png(rgb))
        (cache / f"{i + 10:032x}").write_text(f"photo {i}\n")
        (data / f"p{i}.png").symlink_to(cache / f"{i:032x}")
        (data / f"p{i}.txt").symlink_to(cache / f"{i + 10:032x}")
    (data / "leak.png").symlink_to(tmp_path / "elsewhere.png")  # not the cache: refused
    (tmp_path / "elsewhere.png").write_bytes(png())
    (data / "leak.txt").write_text("x\n")
    manifest = prepare(DataConfig(source="folder", input=data, out=tmp_path / "out"))
    assert manifest["splits"]["train"]["images"] == 3
    assert manifest["skipped_counts"] == {"not_regular_file": 1}


def test_fifo_named_as_a_webdataset_shard_is_a_counted_skip(tmp_path, alarm):
    src = tmp_path / "wds"
    src.mkdir()
    tar_of(src / "a.tar", {"k.png": png(), "k.txt": b"a caption"})
    os.mkfifo(src / "b.tar")
    manifest = prepare(DataConfig(source="webdataset", input=src, out=tmp_path / "o"))
    assert manifest["skipped_counts"] == {"not_regular_file": 1}
    assert manifest["splits"]["train"]["images"] == 1


# ----------------------------------------------------- 3. nothing published that helps undo it


def test_random_baseline_noise_is_not_regenerated_from_public_data(made, tmp_path, tiny_poison):
    """The random baseline drew its noise from seed + 1 (default seed 0): the published set
    alone gave back 99.74 % of the clean pixels exactly."""
    cfg = PoisonConfig(
        clean=made["clean"],
        out=tmp_path / "pub",
        private=tmp_path / "priv",
        **tiny_poison | {"method": "random"},
    )
    poison(cfg)
    noise = np.load(cfg.private / "noise.npy")
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # what the old code did, all public
    pool = torch.arange(10)
    pool[torch.randint(len(pool), (noise.shape[0], cfg.trigger_len), generator=gen)]
    torch.randperm(noise.shape[0], generator=gen)
    e = int(cfg.epsilon)
    guess = torch.randint(-e, e + 1, noise.shape, generator=gen).numpy()
    assert (guess == noise).mean() < 0.2  # chance: about 1 / 17
    private = json.loads((cfg.private / "triggers.json").read_text())
    assert isinstance(private["noise_seed"], int)
    public = (cfg.out / "manifest.json").read_text()
    assert "noise_seed" not in public and str(private["noise_seed"]) not in public


def test_published_files_hold_no_local_paths(made, tmp_path):
    """Public manifest.json held `clean`, `config.clean` and `config.out`, and every metadata
    `source` was an absolute local path (with `mme protect`, the private folder's)."""
    root = str(made["root"])
    export(made["pub"], tmp_path / "wds", "webdataset")
    published = [*made["pub"].iterdir(), *made["export"].iterdir(), *(tmp_path / "wds").iterdir()]
    for path in published:
        data = path.read_bytes()
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                data = b"".join(tar.extractfile(m).read() for m in tar if m.isfile())
        assert root.encode() not in data and b"/tmp/" not in data, path


# -------------------------------------------------------- 4. one bad item is a counted skip


def tar_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_file_name_of_150_characters_is_ingested(tmp_path):
    """A file name of >= 97 characters aborted prepare ("name is too long", USTAR tars)."""
    src = tmp_path / "src"
    src.mkdir()
    name = "a-very-long-photo-name-" + "x" * 127
    (src / f"{name}.png").write_bytes(png())
    (src / f"{name}.txt").write_text("a long name\n")
    manifest = prepare(DataConfig(source="folder", input=src, out=tmp_path / "out"))
    assert manifest["splits"]["train"]["images"] == 1
    (sample,) = shards.iter_samples(tmp_path / "out", "train")
    assert sample.id == name


def test_deeply_nested_json_in_a_shard_is_a_clear_error(tmp_path):
    """Deeply nested JSON in a shard gave a RecursionError traceback."""
    deep = b"[" * 200_000 + b"]" * 200_000
    tar_of(tmp_path / "train-000000.tar", {"k.png": png(), "k.json": deep, "k.txt": b"cap"})
    with pytest.raises(shards.BadShard, match="sample k"):
        list(shards.iter_samples(tmp_path, "train"))
    src = tmp_path / "wds"
    src.mkdir()
    tar_of(src / "a.tar", {"k.png": png(), "k.json": deep, "ok.png": png(), "ok.txt": b"c"})
    manifest = prepare(DataConfig(source="webdataset", input=src, out=tmp_path / "o"))
    assert manifest["skipped_counts"] == {"no_valid_captions": 1}


def test_tar_member_declaring_ten_gigabytes_is_a_counted_skip(tmp_path):
    """A member declaring 10 GB gave a tarfile.ReadError traceback in prepare --source
    webdataset."""
    src = tmp_path / "wds"
    src.mkdir()
    tar_of(src / "a.tar", {"ok.png": png(), "ok.txt": b"fine"})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("big.png")
        info.size = 10 << 30
        tar.addfile(info)  # a header only: the 10 GB are not there
    (src / "b.tar").write_bytes(raw.getvalue())
    manifest = prepare(DataConfig(source="webdataset", input=src, out=tmp_path / "o"))
    assert manifest["splits"]["train"]["images"] == 1
    assert sum(manifest["skipped_counts"].values()) == 1


def test_attack_on_a_crafted_key_is_one_line(made, tmp_path, capsys):
    """`mme attack` showed a traceback for a bad key."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_bytes((made["pub"] / "manifest.json").read_bytes())
    tar_of(bad / "train-000000.tar", {"../evil.png": png(), "../evil.txt": b"x"})
    argv = ["attack", "--params", "none", "--protected", str(bad), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mme")]  # not the progress bar
    assert "Traceback" not in err and len(lines) == 1 and "KEY.EXT" in lines[0]
    assert not (tmp_path / "o").exists()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` pixels in a few bytes (the pixels are not there)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body


def test_attack_counts_a_bomb_image_and_a_duplicate_id(made, tmp_path):
    """`mme attack` showed a traceback for a bomb PNG and accepted duplicate ids."""
    samples = list(shards.iter_samples(made["pub"], "train"))
    bomb = shards.Sample("bomb", bomb_png(20_000, 20_000), "png", ["a caption"], {"id": "bomb"})
    src = tmp_path / "src"
    shards.write_shards(src, "train", [*samples, samples[0], bomb])
    (src / "manifest.json").write_bytes((made["pub"] / "manifest.json").read_bytes())
    argv = ["attack", "--params", "none", "--protected", str(src), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    split = manifest["splits"]["train"]
    assert split["images"] == len(samples)
    assert split["skipped_counts"] == {"duplicate_id": 1, "unreadable_image": 1}


def test_protect_dry_run_with_a_non_utf8_name_does_not_crash(tmp_path, capsys):
    """`mme protect` crashed on a non-UTF-8 name (plan.py: stat of the escaped name)."""
    from mme.app.plan import scan
    from mme.app.settings import ProtectConfig

    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.png").write_bytes(png())
    (src / "ok.txt").write_text("fine\n")
    with open(os.fsencode(src) + b"/caf\xe9.png", "wb") as f:
        f.write(png((1, 2, 3)))
    cfg = ProtectConfig(input=src, output=tmp_path / "pub")
    found, _ = scan(cfg)
    assert found.images == 1 and found.skip_counts == {"invalid_name": 1}


def test_evaluate_of_a_file_that_is_no_checkpoint_is_one_line(made, tmp_path, capsys):
    argv = ["evaluate", "--params", "none", "--checkpoint", str(made["root"] / "ckpt.pt")]
    assert cli.main([*argv, "--shards", str(made["clean"]), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be loaded safely" in err[0]


# --------------------------------------------------------------- 5. results that are data


def test_prefect_result_naming_a_module_imports_nothing():
    """Prefect's JSON result decoder imported whatever module a result named in __class__ (a
    planted result imported `this`)."""
    planted = b'{"__class__": "this.Planted", "data": {"x": 1}}'
    code = (
        "import sys; from flows.results import PlainJSON; "
        f"print(PlainJSON().loads({planted!r})); print('this' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "False" and "Zen of Python" not in done.stdout


def test_planted_pickle_result_record_is_never_read(tmp_path, orchestrated):
    """A result record may name its own serializer: one planted under a task's cache key and
    naming ``pickle`` would be unpickled when the cache is read."""
    from prefect import flow, task
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer
    from prefect.settings import get_current_settings

    from flows.results import is_plain_record
    from flows.tasks import _cached

    def is_plain(path: Path) -> bool:
        return is_plain_record(path.read_bytes())

    marker, calls = tmp_path / "pwned", []

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    @task(**_cached(lambda ctx, p: "fixed"))
    def work() -> dict:
        calls.append(1)
        return {"a": 1.0}

    @flow
    def once() -> dict:
        return work()

    (tmp_path / "env").mkdir()
    with orchestrated(tmp_path / "env"):
        assert once() == {"a": 1.0} and once() == {"a": 1.0} and len(calls) == 1
        storage = Path(get_current_settings().results.local_storage_path)
        (record,) = [p for p in storage.rglob("*") if p.is_file() and is_plain(p)]
        meta = ResultRecordMetadata(serializer=PickleSerializer(), storage_key=str(record))
        record.write_bytes(ResultRecord(metadata=meta, result=Payload()).serialize())
        assert once() == {"a": 1.0} and len(calls) == 2  # recomputed, the file never read
    assert not marker.exists()
