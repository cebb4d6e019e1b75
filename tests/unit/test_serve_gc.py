"""`serve` takes its start-up objects out of the garbage collector's reach (issue 8's p99: a full
collection walking them stalled whichever batch was in hand), without keeping start-up garbage."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from decision_router.service import BATCH_GC_THRESHOLDS, collecting_for_batches, freeze_startup_objects, serve
from decision_router.settings import Settings

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_startup_objects_are_frozen_and_startup_garbage_collected_first() -> None:
    gc.unfreeze()
    kept = [Node() for _ in range(100)]
    first, second = Node(), Node()
    first.other, second.other = second, first  # a cycle only the cyclic collector frees
    dead = weakref.ref(first)
    del first, second
    gc.disable()  # so that only the freeze's own collection can free the cycle
    try:
        freeze_startup_objects()
    finally:
        gc.enable()
    assert dead() is None  # collected, not frozen for good
    assert gc.get_freeze_count() >= len(kept)  # the survivors are out of reach of later collections
    tracked = {id(o) for o in gc.get_objects()}
    assert not any(id(node) in tracked for node in kept)


def test_serve_collects_the_young_generation_rarely_after_freezing_and_restores_both_after() -> None:
    gc.unfreeze()
    thresholds = gc.get_threshold()
    kept = [Node() for _ in range(100)]
    try:
        with collecting_for_batches():
            assert gc.get_threshold() == BATCH_GC_THRESHOLDS
            assert BATCH_GC_THRESHOLDS[0] >= 10_000  # a batch's live objects no longer trigger collections
            tracked = {id(o) for o in gc.get_objects()}
            assert not any(id(node) in tracked for node in kept)
        # A caller that goes on in the same process (tests, the benchmark) gets the collector back as it was.
        assert gc.get_threshold() == thresholds
        assert gc.get_freeze_count() == 0
        tracked = {id(o) for o in gc.get_objects()}
        assert all(id(node) in tracked for node in kept)
    finally:
        gc.set_threshold(*thresholds)


def test_serve_gives_the_collector_back_as_it_found_it(tmp_path: Path) -> None:
    gc.unfreeze()
    thresholds = gc.get_threshold()
    with socket.socket() as probe:  # a free port for the embedded Redis
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(redis_url=None, database_url=f"sqlite:///{tmp_path / 'store.db'}", rules_dir=RULES_DIR,
                        embedded_port=port)

    async def run() -> tuple[tuple[int, int, int], int]:
        stop = asyncio.Event()
        seen: list[tuple[tuple[int, int, int], int]] = []

        async def stop_once_serving() -> None:
            while gc.get_threshold() != BATCH_GC_THRESHOLDS:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            seen.append((gc.get_threshold(), gc.get_freeze_count()))
            stop.set()

        stopper = asyncio.create_task(stop_once_serving())
        await asyncio.wait_for(serve(settings, stop=stop, api=False), timeout=60)
        await stopper
        return seen[0]

    try:
        serving_thresholds, serving_frozen = asyncio.run(run())
        assert serving_thresholds == BATCH_GC_THRESHOLDS and serving_frozen > 0  # while serving
        assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0  # and after
    finally:
        gc.set_threshold(*thresholds)
