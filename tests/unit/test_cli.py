"""The `metarec` command line: parsing and the replay hand-off (nothing is started)."""

import sqlite3
import sys
import types
from pathlib import Path

import pytest

from app import cli


def test_replay_hands_its_arguments_to_the_replay_module(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str] | None] = []

    def replay_main(argv: list[str] | None) -> int:
        received.append(argv)
        return 3

    module = types.ModuleType("models.replay")
    module.main = replay_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "models.replay", module)

    assert cli.main(["replay", "--data", "u.data", "--help"]) == 3
    assert received == [["--data", "u.data", "--help"]]


def test_replay_says_so_when_the_module_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "models.replay", None)  # makes the import fail

    assert cli.main(["replay"]) == 2
    assert "replay evaluation is not part of this build" in capsys.readouterr().err


def test_every_command_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])

    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("serve", "api", "worker", "migrate", "replay"))


def test_an_unknown_command_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["launch"])

    assert exit_info.value.code == 2
    assert "invalid choice: 'launch'" in capsys.readouterr().err


def test_migrate_brings_a_new_database_to_the_newest_revision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.settings import get_settings

    database = tmp_path / "fresh.db"
    monkeypatch.setenv("METAREC_DATABASE_URL", f"sqlite:///{database}")
    get_settings.cache_clear()
    try:
        assert cli.main(["migrate"]) == 0
    finally:
        get_settings.cache_clear()

    assert capsys.readouterr().out.strip() == "database at revision 0001"
    tables = sqlite3.connect(database).execute("SELECT name FROM sqlite_master WHERE type='table'")
    assert {name for (name,) in tables} >= {"users", "items", "interactions", "slots"}
