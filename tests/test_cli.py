"""The command line explains itself: choices, readable defaults, fast --help, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mme import cli, config
from mme.track import tracking

ROOT = Path(__file__).resolve().parents[1]
ALL = list(cli.COMMANDS)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    from mme.config import DataConfig
    from mme.ingest.prepare import prepare

    out = tmp_path_factory.mktemp("clean")
    prepare(DataConfig(source="synthetic", out=out, n_train=4, n_test=1, image_size=32))
    return out


def _subcommand_actions(command: str):
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]._actions


@pytest.mark.parametrize("command", ALL)
def test_every_flag_has_help_and_no_placeholder_metavar(command):
    for action in _subcommand_actions(command):
        assert action.help, f"{command} {action.option_strings} has no help"
        assert action.metavar != "V"
        assert "PosixPath" not in action.help


def test_choices_come_from_the_types_and_defaults_are_readable(capsys):
    with pytest.raises(SystemExit):
        cli.main(["poison", "--help"])
    out = capsys.readouterr().out
    assert "{mem,em,errmax,random,keyed}" in out and "{auto,cpu,cuda}" in out
    assert "--augment, --no-augment" in out and "EOT: optimise" in out  # on/off keeps its text
    assert "(default: data/protected/mem)" in out.replace("\n", " ").replace("  ", " ") or (
        "data/protected/mem" in out
    )
    assert "PosixPath" not in out and " V " not in out


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from mme import cli\n"
        "for c in cli.COMMANDS:\n"
        "    try:\n"
        "        cli.main([c, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'mlflow') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "HEAVY []" in out


def test_version_names_torch_open_clip_and_cuda():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "mme", "--version"], capture_output=True, text=True, env=env
    ).stdout
    assert out.startswith("mme ") and "torch" in out and "open_clip" in out and "CUDA" in out


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    with pytest.raises(SystemExit) as done:
        rc = cli.main(argv)
        raise SystemExit(rc)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("mme: no ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_error_missing_image_folder(capsys, tmp_path):
    argv = ["prepare", "--params", "none", "--source", "folder", "--input", str(tmp_path / "no")]
    _one_line_error(capsys, argv + ["--out", str(tmp_path / "o")], "no such folder", "data.input")


def test_error_missing_csv(capsys, tmp_path):
    argv = ["prepare", "--params", "none", "--source", "csv", "--csv", str(tmp_path / "x.csv")]
    _one_line_error(capsys, argv + ["--out", str(tmp_path / "o")], "no such CSV file", "data.csv")


def test_error_cuda_without_cuda(capsys, tmp_path, clean, monkeypatch):
    import torch

    monkeypatch.setenv("MME_TRACKING", "off")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["poison", "--params", "none", "--clean", str(clean), "--device", "cuda"]
    argv += ["--out", str(tmp_path / "p"), "--private", str(tmp_path / "q")]
    _one_line_error(capsys, argv, "CUDA", "--device cpu")


def test_error_missing_pretrained(capsys, tmp_path, clean, monkeypatch):
    monkeypatch.setenv("MME_TRACKING", "off")
    argv = ["poison", "--params", "none", "--clean", str(clean), "--model", "mme-tiny-vit"]
    argv += ["--pretrained", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "p")]
    argv += ["--private", str(tmp_path / "q")]
    _one_line_error(capsys, argv, "nope.pt", "not found")


def test_error_missing_params_file_unless_default(capsys, tmp_path, monkeypatch):
    _one_line_error(capsys, ["prepare", "--params", str(tmp_path / "typo.yaml")], "typo.yaml")
    monkeypatch.chdir(tmp_path)  # the default params.yaml is absent here: built-in defaults
    assert config.read_params(config.DEFAULT_PARAMS) == config.STANDALONE_PARAMS


def test_error_bad_choice_and_bad_value_are_one_line(capsys):
    _one_line_error(capsys, ["poison", "--params", "none", "--method", "magic"], "mem", "magic")
    _one_line_error(capsys, ["poison", "--no-such-flag"], "unrecognized arguments")
    _one_line_error(capsys, ["poison", "--params", "none", "--epsilon", "-1"], "poison.epsilon")


def test_without_params_file_poison_is_not_the_paper_schedule_on_a_tiny_model(tmp_path):
    cfg = config.load_section("poison", None)
    assert (cfg.rounds, cfg.surrogate_steps) != (20, 200)
    assert cfg.model == config.PHOTO_PROFILE["model"] != "mme-tiny-vit"
    assert config.load_section("poison", config.DEFAULT_PARAMS.resolve()).rounds == 6  # repo's


def test_tracking_switches_off_in_one_line_without_mlflow(monkeypatch, capsys):
    monkeypatch.setenv("MME_TRACKING", "on")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` sees when absent
    monkeypatch.setattr(tracking, "_missing_noted", [])
    assert tracking.enabled() is False and tracking.enabled() is False
    with tracking.start_run("x", "y", {"a": 1}) as run_id:
        tracking.log_metrics({"m": 1.0})
    assert run_id is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [e for e in err if "MLflow is not installed" in e] and len(err) == 1


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({}, {"GOMP_SPINCOUNT": "10000"}),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
        ({"GOMP_SPINCOUNT": "0"}, {"GOMP_SPINCOUNT": "0"}),
    ],
)
def test_openmp_spins_briefly_unless_the_user_chose(before, after):
    from mme import cpuisa

    environ = dict(before)
    cpuisa.short_openmp_spin(environ)
    assert environ == after


def test_openmp_spin_count_is_set_before_torch_loads():
    code = (
        "import os, sys\n"
        "from mme import cli\n"
        "try:\n"
        "    cli.main(['poison', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('SPIN', os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)\n"
    )
    drop = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "SPIN 10000 False" in out
