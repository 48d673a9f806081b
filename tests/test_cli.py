"""The command line: real help texts for every verb, one-line errors for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

VERBS = ["demo-data", "validate", "import-deepfakebench", "train", "merge", "evaluate", "gate", "promote", "rollback", "models",
         "export", "publish", "serve", "run", "import-checkpoint", "register-specialist"]


def r2m(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "r2m.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_top_level_help_lists_every_verb():
    proc = r2m("--help")
    assert proc.returncode == 0
    for verb in VERBS:
        assert verb in proc.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_a_real_help_text(verb):
    proc = r2m(verb, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and "not implemented" not in proc.stdout
    assert len(proc.stdout.splitlines()) > 4  # a description and its options, not a bare usage line


def test_bad_params_file_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochz: 3\n")
    proc = r2m("run", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown key 'train.epochz'" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------- the last-resort handler


def _crash(*args, **kwargs):
    raise ZeroDivisionError("division by zero\nsecond line")


def _validate_with(project, monkeypatch, raise_fn):
    import r2m.data
    from typer.testing import CliRunner

    from r2m.cli import app

    monkeypatch.setattr(r2m.data, "validate_data_root", raise_fn)  # a bug deep in a verb
    (project / "data").mkdir(exist_ok=True)
    return CliRunner().invoke(app, ["validate", str(project / "data")])


def test_an_unexpected_exception_is_one_line_naming_it_and_its_crash_log(project, monkeypatch):
    from r2m.cli import EXIT_BUG
    from r2m.fileio import new_file_mode

    result = _validate_with(project, monkeypatch, _crash)
    assert result.exit_code == EXIT_BUG == 70, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    line = lines[0]
    assert line.startswith("r2m validate: internal error, a bug in r2m") and "ZeroDivisionError: division by zero second line" in line
    log = Path(line.rsplit("full traceback in ", 1)[1])
    assert log.parent == project / "logs" and log.name.startswith("r2m-crash-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "_crash" in text and "ZeroDivisionError" in text
    assert log.stat().st_mode & 0o777 == new_file_mode()  # readable by the group where the umask says so


def test_the_crash_log_falls_back_to_the_temp_folder(project, monkeypatch, tmp_path_factory):
    import tempfile

    temp = tmp_path_factory.mktemp("temp")
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    (project / "logs").write_text("a file where the folder would be")
    result = _validate_with(project, monkeypatch, _crash)
    assert result.exit_code == 70, result.output
    log = Path(result.stderr.strip().rsplit("full traceback in ", 1)[1])
    assert log.parent == temp and "ZeroDivisionError" in log.read_text()


def test_only_an_unexpected_exception_becomes_exit_70(project, monkeypatch):
    """Exit status by what was raised: bad input 2 (as before), Ctrl-C 130, SystemExit's and a verb's
    own typer.Exit code (untouched), anything else 70 with a crash log. No log for the others."""
    import typer

    from r2m.errors import DatasetError

    cases = [(DatasetError(project / "data", "a bad dataset"), 2, "a bad dataset"), (KeyboardInterrupt(), 130, ""),
             (SystemExit(5), 5, ""), (typer.Exit(code=1), 1, ""), (ValueError("oops"), 70, "ValueError: oops")]
    for exc, code, said in cases:
        def raise_it(*args, exc=exc, **kwargs):
            raise exc

        logs = sorted((project / "logs").glob("*")) if (project / "logs").is_dir() else []
        result = _validate_with(project, monkeypatch, raise_it)
        assert result.exit_code == code, (exc, result.output)
        assert said in result.stderr and ("bug in r2m" in result.stderr) == (code == 70), (exc, result.stderr)
        new_logs = sorted((project / "logs").glob("*")) if (project / "logs").is_dir() else []
        assert len(new_logs) - len(logs) == (1 if code == 70 else 0), exc
