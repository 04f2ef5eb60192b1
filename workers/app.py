"""The Celery application, configured from `common.settings`.

With `TOTALRECALL_BROKER_URL` set, tasks go through the broker to `totalrecall worker` processes. Without
it, tasks run in the calling process when they are enqueued (eager mode), so the embedded default (SQLite,
local storage) needs no Redis. Task state lives in the database, never in a Celery result backend.

Delivery is at-least-once: tasks are acknowledged after they finish (`acks_late`), a task whose worker
process died is requeued (`reject_on_worker_lost`, and Redis redelivers unacknowledged tasks after
`visibility_timeout`), so every task must be idempotent (see `workers.tasks`).

Broker outages: a worker reconnects for ever (`broker_connection_max_retries=None`) and lets running tasks
finish (their results go to the database, not the broker); sending a task retries for
`TOTALRECALL_ENQUEUE_RETRY_SECONDS`. Tasks that a broker restart loses are found and sent again by the
workers' recovery sweep (`workers.recovery`).
"""

from __future__ import annotations

import warnings
from typing import Any

from celery import Celery, signals
from celery.exceptions import CPendingDeprecationWarning
from celery.schedules import crontab
from kombu import Exchange, Queue

from common.logs import setup_logging
from common.settings import Settings, get_settings

FIT_QUEUE = "fit"
SCORE_QUEUE = "score"
FIT_TASK = "workers.tasks.fit_product"
SCORE_TASK = "workers.tasks.score_chunk"
NIGHTLY_TASK = "workers.tasks.nightly_inspection"


def publish_retry_policy(seconds: float) -> dict:
    """kombu retry policy that keeps trying to send a task for about `seconds` (waits 0, 1, 2 ... 5 s)."""
    waited, retries, interval_max = 0.0, 0, 5.0
    while waited < seconds:
        waited += min(float(retries), interval_max)
        retries += 1
    return {"max_retries": retries, "interval_start": 0, "interval_step": 1, "interval_max": interval_max}


def transport_options(settings: Settings) -> dict:
    """Redis transport options: visibility timeout, and how often workers look for expired tasks."""
    return {
        "visibility_timeout": settings.visibility_timeout,
        # kombu scans for unacknowledged tasks past their visibility timeout every interval x throttle
        # seconds (100 s by default); keep that well below the timeout.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 5)),
        "unacked_restore_throttle": 1,
        "socket_timeout": 30,  # a half-open connection fails instead of blocking a publish for ever
        "socket_connect_timeout": 10,
    }


def celery_config(settings: Settings) -> dict:
    """The Celery settings for `settings` (a plain dict, so tests can inspect it)."""
    score_soft, score_hard = settings.score_time_limits
    fit_soft, fit_hard = settings.fit_time_limits
    hour, minute = settings.nightly_time
    return {
        "broker_url": settings.broker_url or "memory://localhost/",  # with a host: kombu warns without one
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,  # a worker waits for the broker for ever
        # Tasks running when the broker goes away finish and write their results; their (late) ack is
        # lost with the connection, so the broker may deliver them again: harmless, tasks are idempotent.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_publish_retry": True,
        "task_publish_retry_policy": publish_retry_policy(settings.enqueue_retry_seconds),
        "broker_transport_options": transport_options(settings),
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
    """(Re)apply the settings to `celery_app`, e.g. after tests changed the environment.

    Connections made under the previous settings are forgotten: an in-process run acquires a producer
    from the in-memory transport, and tasks sent later would otherwise still go there.
    """
    celery_app.conf.update(celery_config(settings or get_settings()))
    celery_app._pool = None  # what Celery itself resets after a fork (Celery._after_fork)
    amqp = celery_app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    return celery_app


# Celery warns on every broker reconnect that it might one day cancel running tasks; we chose not to (above).
warnings.filterwarnings("ignore", message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss",
                        category=CPendingDeprecationWarning)

@signals.setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Worker and beat log through `common.logs` (one line per event), Celery's own messages included."""
    setup_logging(loglevel or "INFO")


app = configure(Celery("totalrecall", include=["workers.tasks"]))
from workers.local_disk import DiskTidyStep  # noqa: E402
from workers.recovery import RecoveryStep  # noqa: E402 - needs `app`'s module loaded first

app.steps["worker"].add(RecoveryStep)
app.steps["worker"].add(DiskTidyStep)
