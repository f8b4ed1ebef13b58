"""mme.guard: the one output guard (ownership marker with command, role and run; tied private
folders; file outputs of their own kind; no overlap; lock). Pure folder-level tests; every
command against every other command's folder is in test_safety.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from mme import fsio, guard
from mme.guard import File, Folder, OutputRefused, claim


@pytest.fixture
def alarm():
    """Fail (SIGALRM) instead of hanging the suite if a read blocks."""
    signal.alarm(60)
    yield
    signal.alarm(0)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_fresh_folder_gets_a_marker_naming_command_role_and_run(tmp_path):
    out = tmp_path / "out"
    with claim("mme attack", [Folder(out)], {}, settings={"a": 1}) as c:
        assert c.run == guard.run_id("mme attack", {"a": 1})
    marker = json.loads((out / fsio.OWNER).read_text())
    assert marker == {"command": "mme attack", "role": "out", "run": c.run}


def test_same_settings_give_the_same_marker(tmp_path):
    """DVC hashes the folder, marker included: a re-run must not change it."""
    texts = []
    for _ in range(2):
        with claim("mme attack", [Folder(tmp_path / "o")], {}, settings={"x": [1, 2]}):
            pass
        texts.append((tmp_path / "o" / fsio.OWNER).read_bytes())
    assert texts[0] == texts[1]


def test_folder_of_another_command_is_refused_untouched(tmp_path):
    out = tmp_path / "out"
    with claim("mme prepare", [Folder(out)], {}):
        (out / "train-000000.tar").write_bytes(b"clean")
    before = files_of(out)
    with pytest.raises(OutputRefused, match="`mme prepare` made it"):
        with claim("mme attack", [Folder(out)], {}):
            pytest.fail("must not get here")
    assert files_of(out) == before


def test_private_folder_is_never_claimed_as_public(tmp_path):
    """poison --out pointed at an earlier run's private folder deleted its noise."""
    pub, priv = tmp_path / "pub", tmp_path / "priv"
    with claim("mme poison", [Folder(pub, "public"), Folder(priv, "private", tied_to=pub)], {}):
        (priv / "noise.npy").write_bytes(b"noise")
    with pytest.raises(OutputRefused, match="private"):
        with claim("mme poison", [Folder(priv, "public"), Folder(tmp_path / "p2", "private")], {}):
            pass
    assert (priv / "noise.npy").read_bytes() == b"noise"


def test_private_folder_tied_to_another_public_folder_is_refused(tmp_path):
    """Two poison runs with different --out and the default private folder: the second one
    overwrote the first one's noise."""
    priv = tmp_path / "private"
    outs = [Folder(tmp_path / "pub1", "public"), Folder(priv, "private", tied_to=tmp_path / "pub1")]
    with claim("mme poison", outs, {}):
        (priv / "noise.npy").write_bytes(b"first run")
    second = [
        Folder(tmp_path / "pub2", "public"),
        Folder(priv, "private", tied_to=tmp_path / "pub2"),
    ]
    with pytest.raises(OutputRefused, match="holds the private files of"):
        with claim("mme poison", second, {}):
            pass
    assert (priv / "noise.npy").read_bytes() == b"first run"
    with claim("mme poison", outs, {}):  # the same pair again: fine
        pass


def test_tie_survives_moving_the_project(tmp_path):
    a = tmp_path / "a"
    outs = [Folder(a / "pub", "public"), Folder(a / "priv", "private", tied_to=a / "pub")]
    with claim("mme poison", outs, {}):
        (a / "priv" / "noise.npy").write_bytes(b"n")
    b = tmp_path / "b"
    a.rename(b)
    with claim(
        "mme poison",
        [Folder(b / "pub", "public"), Folder(b / "priv", "private", tied_to=b / "pub")],
        {},
    ):
        pass


def test_user_folder_without_marker_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    for force in (False, True):
        with pytest.raises(OutputRefused, match="no mme command made it"):
            with claim("mme export", [Folder(home, needs_force=True)], {}, force=force):
                pass
    assert (home / "thesis.tex").read_text() == "years of work"


def test_needs_force_keeps_an_earlier_output(tmp_path):
    out = tmp_path / "out"
    with claim("mme export", [Folder(out, needs_force=True)], {}):
        (out / "a.png").write_bytes(b"x")
    with pytest.raises(OutputRefused, match="--force"):
        with claim("mme export", [Folder(out, needs_force=True)], {}):
            pass
    with claim("mme export", [Folder(out, needs_force=True)], {}, force=True):
        pass


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_overlapping_an_input_is_refused(tmp_path, where):
    inp = tmp_path / "in"
    inp.mkdir()
    out = {"same": inp, "inside": inp / "sub", "parent": tmp_path}[where]
    with pytest.raises(OutputRefused, match="overlap"):
        with claim("mme attack", [Folder(out)], {"protected set": inp}):
            pass
    assert not (inp / fsio.OWNER).exists()


def test_two_outputs_of_one_run_may_not_overlap(tmp_path):
    with pytest.raises(OutputRefused, match="overlap"):
        with claim(
            "mme poison",
            [Folder(tmp_path / "a", "public"), Folder(tmp_path / "a" / "b", "private")],
            {},
        ):
            pass


def test_file_output_replaces_only_its_own_kind(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"weights")
    kind = guard.json_object_with("rsum")
    with pytest.raises(OutputRefused, match="overlap"):  # evaluate --checkpoint X --out X
        with claim("mme evaluate", [File(ckpt, kind)], {"checkpoint": ckpt}):
            pass
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    with pytest.raises(OutputRefused, match="not a file `mme evaluate` writes"):
        with claim("mme evaluate", [File(other, kind)], {}):
            pass
    mine = tmp_path / "metrics.json"
    mine.write_text('{"rsum": 1.0}')
    with claim("mme evaluate", [File(mine, kind)], {}):
        pass
    assert ckpt.read_bytes() == b"weights" and other.read_text() == '{"mine": 1}'


def test_file_output_that_is_a_link_or_a_folder_is_refused(tmp_path):
    target = tmp_path / "target.json"
    target.write_text('{"rsum": 1}')
    link = tmp_path / "link.json"
    link.symlink_to(target)
    for path in (link, tmp_path):
        with pytest.raises(OutputRefused, match="not a plain file"):
            with claim("mme evaluate", [File(path, guard.json_object_with("rsum"))], {}):
                pass


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    with claim("mme attack", [Folder(out)], {}):
        with pytest.raises(OutputRefused, match="another process"):
            with claim("mme attack", [Folder(out)], {}):
                pass


@pytest.mark.parametrize(
    ("content", "names", "owner"),
    [
        ("mme poison\n", ["manifest.json"], guard.Owner("mme poison", "public")),
        ("mme poison\n", ["noise.npy"], guard.Owner("mme poison", "private")),
        ("mme prepare\n", ["x"], guard.Owner("mme prepare", "out")),
        (None, ["trainer", "checkpoint.pt", "train.json"], guard.Owner("mme train", "run")),
        (None, ["photo.jpg"], guard.Owner("")),
        ("[1, 2]", ["x"], guard.Owner("")),
        ("[" * 100_000, ["x"], guard.Owner("")),
    ],
)
def test_markers_written_before_runs_are_still_recognised(tmp_path, content, names, owner):
    for name in names:
        (tmp_path / name).write_bytes(b"{}")
    if content is not None:
        (tmp_path / fsio.OWNER).write_text(content)
    assert guard.owner_of(tmp_path) == owner


def test_fifo_as_marker_does_not_hang(tmp_path, alarm):
    (tmp_path / "x").write_text("x")
    os.mkfifo(tmp_path / fsio.OWNER)
    assert guard.owner_of(tmp_path) == guard.Owner("")


def test_metrics_file_leaves_no_lock_file_in_its_folder(tmp_path):
    """A lock file beside metrics/clean.json changed the DVC-tracked metrics/ folder on every
    run (it holds the writer's pid), so `dvc exp run` re-ran the report stage for nothing."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    out = guard.File(metrics / "clean.json", guard.json_object_with("rsum"))
    with claim("mme evaluate", [out], {}):
        (metrics / "clean.json").write_text('{"rsum": 1}')
    assert [p.name for p in metrics.iterdir()] == ["clean.json"]
