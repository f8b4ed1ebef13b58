"""Configuration: params.yaml sections, CLI overrides, and error messages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mme import cli
from mme.config import ConfigError, DataConfig, PoisonConfig, load_section

COMMANDS = ["prepare", "poison", "verify", "export", "train", "evaluate"]


def write_params(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_params_file_and_cli_overrides(tmp_path):
    params = write_params(tmp_path, "data:\n  n_train: 7\n  seed: 3\n")
    cfg = load_section("data", params, {"seed": "5", "n_test": None})
    assert isinstance(cfg, DataConfig)
    assert (cfg.n_train, cfg.seed, cfg.n_test) == (7, 5, 500)


@pytest.mark.parametrize(
    "text, needles",
    [
        ("data:\n  n_trian: 5\n", ["data.n_trian", "unknown key", "n_train"]),
        ("data:\n  source: s3\n", ["data.source = 's3'", "synthetic", "webdataset"]),
        ("data:\n  image_size: 3\n", ["data.image_size = 3", "greater than or equal to 16"]),
        ("data:\n  source: csv\n", ["needs one of: csv, train_csv"]),
        ("poison:\n  epsilon: -1\n", ["poison.epsilon = -1", "greater than 0"]),
        ("poison:\n  trigger_len: 0\n", ["poison.trigger_len = 0"]),
        ("poison:\n  epsilon: 7.5\n", ["poison.epsilon = 7.5", "whole number of pixel levels"]),
        ("poison:\n  step_size: 0.5\n", ["poison.step_size = 0.5", "whole number"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(tmp_path, text, needles):
    section = text.split(":")[0]
    with pytest.raises(ConfigError) as err:
        load_section(section, write_params(tmp_path, text))
    for needle in needles:
        assert needle in str(err.value)


def test_cli_reports_config_errors_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, "data:\n  colour: red\n")
    assert cli.main(["prepare"]) == 2
    err = capsys.readouterr().err
    assert "data.colour" in err and "unknown key" in err


def test_defaults_follow_the_paper_where_stated():
    p = PoisonConfig()
    assert (p.epsilon, p.step_size, p.pgd_steps, p.rounds) == (8, 1, 8, 20)
    assert (p.surrogate_steps, p.trigger_rounds, p.candidates, p.batch_size) == (200, 5, 16, 128)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert "usage: mme " + command in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "mme", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("mme ")


PARAMS_FILES = ["params.yaml", "params.tiny.yaml", "params.paper.yaml", "params.flickr8k.yaml"]


@pytest.mark.parametrize("params", PARAMS_FILES)
def test_every_dvc_yaml_variable_is_in_the_params_file(params):
    """`cp params.paper.yaml params.yaml && dvc repro` must not fail on a missing ${...}."""
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    values = yaml.safe_load((root / params).read_text())
    used = set(re.findall(r"\$\{(\w+)\.(\w+)\}", (root / "dvc.yaml").read_text()))
    missing = [f"{s}.{k}" for s, k in used if k not in (values.get(s) or {})]
    assert missing == []


@pytest.mark.parametrize("params", PARAMS_FILES)
def test_every_params_file_is_valid(params):
    from pathlib import Path

    from mme.config import SECTIONS, load_section

    root = Path(__file__).resolve().parents[1]
    for section in SECTIONS:
        load_section(section, root / params, {})  # a wrong key or value raises ConfigError


def test_the_tiny_profile_is_params_yaml_made_small():
    """params.tiny.yaml differs from params.yaml in sizes only (and its MLflow experiment), so
    `make run-tiny` tries the pipeline that `make run` runs, on the same paths."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    full, tiny = (
        yaml.safe_load((root / f).read_text()) for f in ("params.yaml", "params.tiny.yaml")
    )
    sizes = {"n_train", "n_test", "rounds", "surrogate_steps", "batch_size", "trigger_rounds"}
    sizes |= {"candidates", "pgd_steps", "epochs", "warmup", "threads", "experiment"}
    sizes |= {"pattern_steps"}
    assert tiny.keys() == full.keys()
    changed = {
        (s, k)
        for s in full
        for k in {*(full[s] or {}), *(tiny[s] or {})}
        if isinstance(full[s], dict) and (full[s].get(k) != (tiny[s] or {}).get(k))
    }
    assert {k for _, k in changed} <= sizes, changed
    assert all(full[s] == tiny[s] for s in full if not isinstance(full[s], dict))
