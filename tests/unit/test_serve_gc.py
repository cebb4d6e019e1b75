"""`serve` takes its start-up objects out of the garbage collector's reach (issue 8's p99: a full
collection walking them stalled whichever batch was in hand), without keeping start-up garbage."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from decision_router.service import BATCH_GC_THRESHOLDS, collect_for_batches, freeze_startup_objects


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


def test_serve_collects_the_young_generation_rarely_after_freezing() -> None:
    thresholds = gc.get_threshold()
    kept = [Node() for _ in range(100)]
    try:
        collect_for_batches()
        assert gc.get_threshold() == BATCH_GC_THRESHOLDS
        assert BATCH_GC_THRESHOLDS[0] >= 10_000  # a batch's live objects no longer trigger collections
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(node) in tracked for node in kept)
    finally:
        gc.set_threshold(*thresholds)
