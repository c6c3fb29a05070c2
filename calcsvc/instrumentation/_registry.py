"""Metric families created lazily, once per prometheus_client registry."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, TypeVar
from weakref import WeakKeyDictionary

from prometheus_client import REGISTRY

if TYPE_CHECKING:
    from collections.abc import Callable

    from prometheus_client import CollectorRegistry

T = TypeVar("T")

# Latency buckets shared by every calcsvc histogram: 0.5 ms to 10 s, fine
# enough below a millisecond to show a rejected call beside a network call.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def per_registry(
    create: Callable[[CollectorRegistry], T],
) -> Callable[[CollectorRegistry | None], T]:
    """Wrap ``create`` so it runs once per registry, on first use.

    Importing calcsvc registers nothing, and any number of clients and
    servers in one process share one set of families per registry instead of
    colliding. ``None`` stands for prometheus_client's global registry.
    """
    made: WeakKeyDictionary[CollectorRegistry, T] = WeakKeyDictionary()
    lock = threading.Lock()

    def get(registry: CollectorRegistry | None = None) -> T:
        registry = REGISTRY if registry is None else registry
        with lock:
            families = made.get(registry)
            if families is None:
                families = made[registry] = create(registry)
            return families

    return get
