"""The `stats` command reads an SQLite store through a memory map (store.make_engine(mapped_reads=True):
~15% off the scan of a million alerts); the service's engine does not, so its RSS does not count the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from decision_router import cli_stats
from decision_router.settings import Settings
from decision_router.store import MEMORY_MAP_BYTES, make_engine

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"


def _mmap_size(engine) -> int:  # noqa: ANN001
    with engine.connect() as connection:
        return connection.execute(text("PRAGMA mmap_size")).scalar_one()


def test_only_an_engine_for_mapped_reads_maps_the_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    mapped, plain = make_engine(url, mapped_reads=True), make_engine(url)
    try:
        assert _mmap_size(mapped) == MEMORY_MAP_BYTES
        assert _mmap_size(plain) == 0
    finally:
        mapped.dispose()
        plain.dispose()


def test_the_stats_commands_read_through_the_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "store.db").touch()  # the stats commands refuse a store file that does not exist
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'store.db'}", rules_dir=RULES_DIR)
    seen = cli_stats._read(settings, lambda session: session.execute(text("PRAGMA mmap_size")).scalar_one())
    assert seen == MEMORY_MAP_BYTES
