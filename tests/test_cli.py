"""`glmv`: a user error (GlmvError, a missing or existing file) is one line and exit status 2; a bug of ours keeps
its traceback."""
from __future__ import annotations

import pytest

from glmv_jax import cli
from glmv_jax.errors import CheckpointError


def test_user_errors_are_one_line(tmp_path, capsys):
    code = cli.main(["train", "--config", str(tmp_path / "missing.yaml"), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"glmv train: error: no training config at {tmp_path / 'missing.yaml'}"

    bad = tmp_path / "bad.yaml"
    bad.write_text("rl: {groups: 0}\n")
    code = cli.main(["train", "--config", str(bad), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "glmv train: error: rl.groups = 0 must be a positive integer"
    assert not (tmp_path / "w").exists()


def test_a_glmv_error_from_a_command_is_one_line(monkeypatch, capsys):
    def broken(args):
        raise CheckpointError("checkpoint /x does not match this run")

    monkeypatch.setattr(cli, "_convert", broken)
    assert cli.main(["convert", "a", "b", "--to", "hf"]) == 2
    assert capsys.readouterr().err.strip() == "glmv convert: error: checkpoint /x does not match this run"


def test_an_internal_bug_shows_its_traceback(monkeypatch, capsys):
    """Not a user error: the exception leaves `main` (Python prints the traceback, exit status 1), not status 2."""
    def buggy(args):
        return {}["missing"]

    monkeypatch.setattr(cli, "_convert", buggy)
    with pytest.raises(KeyError, match="missing"):
        cli.main(["convert", "a", "b", "--to", "hf"])
    assert "error:" not in capsys.readouterr().err


def test_an_internal_value_error_is_not_taken_for_bad_input(monkeypatch):
    monkeypatch.setattr(cli, "_convert", lambda args: int("not a number"))
    with pytest.raises(ValueError):
        cli.main(["convert", "a", "b", "--to", "hf"])
