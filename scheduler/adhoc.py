"""Work requested by hand: score a folder of images now, or (re)fit products."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sqlalchemy import select

from common.db import Job, Product, images_with_results, session_scope
from common.images import IMAGE_SUFFIXES
from common.logs import log_context
from common.storage import absolute_uri, list_uris
from scheduler.jobs import (
    ScheduledJob,
    enqueue_fit,
    enqueue_score,
    log_scheduled,
    new_fit_job,
    new_score_job,
)
from scheduler.products import SchedulingError, check_not_empty, get_product, require_active_version
from workers.job_state import describe_error, mark_failed


def score_images(product_name: str, images_uri: str, enqueued_by: str = "cli") -> ScheduledJob:
    """Score the images under `images_uri` with the product's active model.

    Images with an `ok` result for that model are left out; failed ones are scored again.
    """
    with session_scope() as session:
        product = get_product(session, product_name)
        product_id, version_id = product.id, require_active_version(session, product).id
    check_not_empty(images=images_uri)
    images_uri = absolute_uri(images_uri)
    uris = list_uris(images_uri, IMAGE_SUFFIXES)
    if not uris:  # a mistyped folder, or a single file: say so rather than score nothing
        raise SchedulingError(f"no images under {images_uri} (give a folder holding "
                              f"{', '.join(IMAGE_SUFFIXES)} files)")
    with session_scope() as session:
        scored = images_with_results(session, version_id, uris, ok_only=True)
        todo = [u for u in uris if u not in scored]
        job = new_score_job(product_id, version_id, images_uri, len(todo), enqueued_by=enqueued_by)
        session.add(job)
        session.flush()
        job_id, message = job.id, job.error or ""
    scheduled = ScheduledJob(product_name, job_id, True, len(todo), len(scored), message)
    log_scheduled("score", scheduled, images_uri=images_uri)
    if todo:
        with log_context(product=product_name):
            enqueue_score(job_id, todo)
    return scheduled


def enqueue_fits(product_names: Sequence[str] | None = None, enqueued_by: str = "cli") -> list[ScheduledJob]:
    """One fit job per product (all registered products when `product_names` is None), enqueued together.

    Unknown names fail the whole request before anything is created; a fit that cannot be sent (or,
    in-process, fails) is reported in its job's `message`, and the others go on.
    """
    with session_scope() as session:
        if product_names is None:
            products = list(session.scalars(select(Product).order_by(Product.name)))
            if not products:
                raise SchedulingError("no products registered (see `totalrecall product add`)")
        else:
            products = [get_product(session, name) for name in dict.fromkeys(product_names)]
        jobs = [new_fit_job(p, enqueued_by) for p in products]
        session.add_all(jobs)
        session.flush()
        created = [ScheduledJob(p.name, j.id, True, 0) for p, j in zip(products, jobs, strict=True)]
    return [_enqueue_fit(scheduled) for scheduled in created]


def _enqueue_fit(scheduled: ScheduledJob) -> ScheduledJob:
    """Send one product's fit (in-process: run it). A failure fails that job, saying why in the returned
    `message`, and the other products' fits go on."""
    log_scheduled("fit", scheduled)
    with log_context(product=scheduled.product):
        try:
            enqueue_fit(scheduled.job_id)
        except Exception as exc:  # the broker is down, or (in-process) the fit itself failed
            message = str(exc) if isinstance(exc, SchedulingError) else describe_error(exc)
            mark_failed(scheduled.job_id, message)  # done already by the fit or `_send`, unless it crashed
            with session_scope() as session:
                message = session.get(Job, scheduled.job_id).error or message
            return replace(scheduled, message=message)
    return scheduled
