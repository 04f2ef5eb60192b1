"""The Celery application, configured from `common.settings`.

With `TOTALRECALL_BROKER_URL` set, tasks go through the broker to `totalrecall worker` processes. Without
it, tasks run in the calling process when they are enqueued (eager mode), so the embedded default (SQLite,
local storage) needs no Redis. Task state lives in the database, never in a Celery result backend.

Delivery is at-least-once: tasks are acknowledged after they finish (`acks_late`), a task whose worker
process died is requeued (`reject_on_worker_lost`, and Redis redelivers unacknowledged tasks after
`visibility_timeout`), so every task must be idempotent (see `workers.tasks`).
"""

from __future__ import annotations

from celery import Celery
from celery.schedules import crontab
from kombu import Exchange, Queue

from common.settings import Settings, get_settings

FIT_QUEUE = "fit"
SCORE_QUEUE = "score"
FIT_TASK = "workers.tasks.fit_product"
SCORE_TASK = "workers.tasks.score_chunk"
NIGHTLY_TASK = "workers.tasks.nightly_inspection"


def celery_config(settings: Settings) -> dict:
    """The Celery settings for `settings` (a plain dict, so tests can inspect it)."""
    score_soft, score_hard = settings.score_time_limits
    fit_soft, fit_hard = settings.fit_time_limits
    hour, minute = settings.nightly_time
    return {
        "broker_url": settings.broker_url or "memory://",
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "task_always_eager": settings.tasks_in_process,
        "task_eager_propagates": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_queues": tuple(Queue(name, Exchange(name, type="direct"), routing_key=name)
                             for name in (FIT_QUEUE, SCORE_QUEUE)),
        "task_default_queue": SCORE_QUEUE,
        "task_default_exchange": SCORE_QUEUE,
        "task_default_routing_key": SCORE_QUEUE,
        "task_routes": {
            FIT_TASK: {"queue": FIT_QUEUE, "routing_key": FIT_QUEUE},
            SCORE_TASK: {"queue": SCORE_QUEUE, "routing_key": SCORE_QUEUE},
            NIGHTLY_TASK: {"queue": SCORE_QUEUE, "routing_key": SCORE_QUEUE},
        },
        "task_annotations": {
            FIT_TASK: {"soft_time_limit": fit_soft, "time_limit": fit_hard},
            SCORE_TASK: {"soft_time_limit": score_soft, "time_limit": score_hard},
        },
        "timezone": "UTC",
        "enable_utc": True,
        "beat_schedule": {
            "nightly-inspection": {
                "task": NIGHTLY_TASK,
                "schedule": crontab(hour=hour, minute=minute),
                "args": (None,),
            }
        },
        "worker_hijack_root_logger": False,
    }


def configure(celery_app: Celery, settings: Settings | None = None) -> Celery:
    """(Re)apply the settings to `celery_app`, e.g. after tests changed the environment."""
    celery_app.conf.update(celery_config(settings or get_settings()))
    return celery_app


app = configure(Celery("totalrecall", include=["workers.tasks"]))
