"""Work requested by hand: score a folder of images now, or (re)fit products."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from common.db import Product, images_with_results, session_scope
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
from scheduler.products import SchedulingError, get_product, require_active_version


def score_images(product_name: str, images_uri: str, enqueued_by: str = "cli") -> ScheduledJob:
    """Score the images under `images_uri` with the product's active model.

    Images with an `ok` result for that model are left out; failed ones are scored again.
    """
    with session_scope() as session:
        product = get_product(session, product_name)
        product_id, version_id = product.id, require_active_version(session, product).id
    images_uri = absolute_uri(images_uri)
    uris = list_uris(images_uri, IMAGE_SUFFIXES)
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

    Unknown names fail the whole request before anything is created.
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
    for scheduled in created:
        log_scheduled("fit", scheduled)
        with log_context(product=scheduled.product):
            enqueue_fit(scheduled.job_id)
    return created
