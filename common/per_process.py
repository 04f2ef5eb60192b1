"""Objects made once per process and shared by its threads: storage clients, database engines, the Redis
client, the worker's model cache.

A forked child (Celery's prefork pool forks its workers) starts with none of its parent's objects and a
fresh lock: it must not use the parent's sockets or connection pools, nor wait forever on a lock that a
parent thread held at the moment of the fork.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class PerProcess(Generic[K, V]):
    def __init__(self, forget: Callable[[V], None] | None = None) -> None:
        """`forget` is called, in a forked child, on each object inherited from the parent before it is
        dropped (e.g. to release a pool without closing the parent's sockets)."""
        self._forget = forget
        self._objects: dict[K, V] = {}
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The object for `key`, made by `make()` on first use in this process."""
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                obj = self._objects[key] = make()
            return obj

    def pop(self, key: K) -> V | None:
        with self._lock:
            return self._objects.pop(key, None)

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._objects)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        inherited, self._objects = self._objects, {}
        if self._forget is not None:
            for obj in inherited.values():
                self._forget(obj)
