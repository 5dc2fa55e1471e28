"""Issue 16.14: a run directory that cannot be written, and a full disk, are one line each.

As root (CI) chmod does not make a directory read-only, so the read-only and full cases raise the
errno the kernel would (EROFS, ENOSPC) from the write itself; the unwritable-path case is real.
"""

import errno
from pathlib import Path

import pytest

from papo_mega import cli
from papo_mega.errors import PapoError
from papo_mega.run_dir import check_writable, describe_os_error


def test_train_in_an_unwritable_run_dir_stops_before_any_process_group(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = cli.main(["train", "examples/tiny_cpu.yaml", f"run.run_dir={blocker}/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"run.run_dir={blocker}/run" in err[0] and "Not a directory" in err[0]


@pytest.mark.parametrize("code,words", [(errno.EROFS, "Read-only file system"),
                                        (errno.ENOSPC, "no space left on device")])
def test_read_only_and_full_file_systems_name_the_cause_and_fix(tmp_path, monkeypatch, code, words):
    def refuse(*_args, **_kwargs):
        raise OSError(code, "Read-only file system" if code == errno.EROFS else "No space left on device",
                      str(tmp_path / "run" / "probe"))

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(PapoError, match=words) as info:
        check_writable(tmp_path / "run")
    assert "run.run_dir" in str(info.value) and "\n" not in str(info.value)
    assert not list((tmp_path / "run").iterdir())  # the probe left nothing behind


def test_an_os_error_inside_a_command_is_one_line_not_a_traceback(monkeypatch, capsys):
    """A disk that fills mid-run (after the up-front check) reaches main() as an OSError."""
    def full(_args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")

    monkeypatch.setattr(cli, "_cmd_plot", full)
    code = cli.main(["plot", "runs/x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "runs/x/metrics.jsonl" in err[0] and "no space left on device" in err[0]
    assert describe_os_error(OSError(errno.EACCES, "Permission denied", "/x")).endswith("(run.run_dir=PATH)")


def test_a_writable_run_dir_is_created_and_left_clean(tmp_path):
    assert check_writable(tmp_path / "new" / "run") == Path(tmp_path / "new" / "run")
    assert list((tmp_path / "new" / "run").iterdir()) == []
