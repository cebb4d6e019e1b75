"""`serve` takes its start-up objects out of the garbage collector's reach (issue 8's p99: a full
collection walking them stalled whichever batch was in hand), without keeping start-up garbage."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from decision_router.service import freeze_startup_objects


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
