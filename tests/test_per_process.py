"""`PerProcess`: one object per key and process, shared by threads; a forked child starts afresh."""

from __future__ import annotations

import os
import signal
import threading

from common.per_process import PerProcess


def test_one_object_per_key_shared_by_threads() -> None:
    made: list[str] = []

    def make(key: str) -> object:
        made.append(key)
        return object()

    objects: PerProcess[str, object] = PerProcess()
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(objects.get("a", lambda: make("a"))))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == ["a"] and all(obj is seen[0] for obj in seen)
    assert objects.get("b", lambda: make("b")) is not seen[0] and sorted(objects.keys()) == ["a", "b"]
    assert objects.pop("a") is seen[0] and objects.pop("a") is None and objects.keys() == ["b"]


def test_forked_child_starts_empty_with_a_free_lock_and_forgets_what_it_inherited() -> None:
    forgotten: list[object] = []
    objects: PerProcess[str, object] = PerProcess(forget=forgotten.append)
    parent_obj = objects.get("k", object)
    read_end, write_end = os.pipe()
    with objects._lock:  # a parent thread holds the lock at the moment of the fork
        pid = os.fork()
        if pid == 0:  # child: would block forever on the inherited lock; the alarm ends it then
            signal.alarm(10)
            fresh = objects.get("k", object)
            ok = fresh is not parent_obj and forgotten == [parent_obj] and objects.keys() == ["k"]
            os.write(write_end, b"1" if ok else b"0")
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), "the child hung on the parent's lock"
    assert os.read(read_end, 1) == b"1"
    os.close(read_end)
    assert objects.get("k", object) is parent_obj and forgotten == []  # the parent keeps its own
