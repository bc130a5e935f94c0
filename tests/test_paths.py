"""The one atomic record write: a failed write leaves the old file whole and no temporary."""

from pathlib import Path

import pytest

from steppo.paths import write_text_atomic


def test_writes_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "run.json"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "run.json"
    write_text_atomic(target, "old")

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("steppo.paths.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
