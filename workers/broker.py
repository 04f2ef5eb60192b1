"""Direct reads of the Redis broker: what tasks it still holds, how often a task was delivered, a lock.

Celery keeps queued tasks in Redis lists named after the queues and tasks that a worker has received but
not acknowledged in the hash `unacked` (kombu's visibility-timeout emulation). Reading both tells which
jobs still have work coming; `scheduler.recovery` compares that with the result rows to find lost work.

Every function here degrades to "unknown" (None, empty, 1) rather than raising when Redis is unreachable:
none of them may stop a worker from scoring.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from common.logs import log_event
from common.per_process import PerProcess
from common.settings import get_settings
from workers.app import FIT_QUEUE, FIT_TASK, SCORE_QUEUE, SCORE_TASK

logger = logging.getLogger(__name__)

UNACKED_KEY = "unacked"  # kombu's default `unacked_key`
DELIVERIES_PREFIX = "totalrecall:deliveries:"
DELIVERIES_TTL = 7 * 24 * 3600
PAGE = 500

_clients: PerProcess[str, Any] = PerProcess()


def redis_client() -> Any | None:
    """A client for the broker's Redis (one per process), or None without a Redis broker."""
    url = get_settings().broker_url
    if not url or not url.startswith(("redis://", "rediss://", "unix://")):
        return None

    def make() -> Any:
        import redis

        return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)

    return _clients.get(url, make)


def count_delivery(task_id: str | None) -> int:
    """Count one more start of task `task_id` and return the count (1 if unknown or unreachable).

    A redelivered message (its worker died) and a retry keep the task id, so the count grows with both.
    """
    client = redis_client()
    if client is None or not task_id:
        return 1
    key = DELIVERIES_PREFIX + task_id
    try:
        count, _ = client.pipeline().incr(key).expire(key, DELIVERIES_TTL).execute()
        return int(count)
    except Exception as exc:  # never stop scoring because of the counter
        log_event(logger, logging.WARNING, "delivery_not_counted", task=task_id, error=str(exc))
        return 1


LOCK_PREFIX = "totalrecall:lock:"


def try_lock(name: str, seconds: int, owner: str) -> bool:
    """Take the named lock for `seconds` unless someone holds it (it expires then, or `release_lock`)."""
    client = redis_client()
    if client is None:
        return True
    return bool(client.set(LOCK_PREFIX + name, owner, nx=True, ex=max(1, seconds)))


# Delete the lock only if it still holds our token: one that expired and was taken by someone else stays.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def release_lock(name: str, owner: str) -> None:
    """Release the named lock if `owner` still holds it."""
    client = redis_client()
    if client is not None:
        client.eval(_RELEASE, 1, LOCK_PREFIX + name, owner)


@dataclass
class PendingWork:
    """Work the broker still holds: queued, reserved by a worker, or waiting for a retry."""

    images: dict[int, set[str]] = field(default_factory=dict)  # score job id -> image URIs
    fits: set[int] = field(default_factory=set)  # fit job ids

    def add(self, payload: dict[str, Any]) -> None:
        """Record one kombu message payload (the JSON stored in Redis)."""
        task = (payload.get("headers") or {}).get("task")
        if task not in (SCORE_TASK, FIT_TASK):
            return
        body = payload.get("body", "")
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        if task == SCORE_TASK:
            self.images.setdefault(int(args[0]), set()).update(args[1])
        else:
            self.fits.add(int(args[0]))


def pending_work(client: Any, queues: Iterable[str] = (SCORE_QUEUE, FIT_QUEUE)) -> PendingWork:
    """Every score and fit task in the queues or in the unacknowledged hash.

    The queues are read before and after the hash, so a task moving between them while we read (a worker
    taking it, or kombu restoring it after the visibility timeout) is seen at least once.
    """
    pending = PendingWork()
    queues = tuple(queues)
    queued = _queued(client, queues)
    unacked = [(raw, True) for raw in client.hvals(UNACKED_KEY)]
    for raw, wrapped in [*queued, *unacked, *_queued(client, queues)]:
        try:
            payload = json.loads(raw)
            pending.add(payload[0] if wrapped else payload)  # unacked: [payload, exchange, routing key]
        except (ValueError, KeyError, IndexError, TypeError) as exc:  # not a Celery message of ours
            log_event(logger, logging.DEBUG, "broker_message_skipped", reason="unreadable", error=str(exc))
    return pending


def _queued(client: Any, queues: tuple[str, ...]) -> list[tuple[bytes, bool]]:
    out = []
    for queue in queues:
        start = 0
        while True:
            page = client.lrange(queue, start, start + PAGE - 1)
            out.extend((raw, False) for raw in page)
            if len(page) < PAGE:
                break
            start += PAGE
    return out
