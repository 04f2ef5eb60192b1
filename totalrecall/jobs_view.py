"""Reading jobs for people: the jobs table, a job's failures, and waiting for jobs with a progress bar."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from tqdm import tqdm

from common.db import Job, JobKind, JobStatus, Result, ResultStatus, job_summary, session_scope
from common.settings import get_settings

FINISHED = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value)


@dataclass(frozen=True)
class JobView:
    id: int
    kind: str
    product: str
    status: str
    done: int
    failed: int
    total: int
    model_version: int | None
    run_date: str | None
    created_at: datetime | None
    queued_seconds: float | None
    run_seconds: float | None
    error: str | None
    median_score: float | None = None
    warning: str | None = None  # e.g. score drift (common.drift): the job succeeded, but look

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def load_jobs(job_ids: Sequence[int] | None = None, limit: int = 20) -> list[JobView]:
    """The given jobs (in that order), or the `limit` most recent ones, newest first."""
    query = select(job_summary)
    if job_ids is not None:
        query = query.where(job_summary.c.job_id.in_(list(job_ids)))
    else:
        query = query.order_by(job_summary.c.job_id.desc()).limit(limit)
    with session_scope() as session:
        views = [_view(row) for row in session.execute(query)]
    if job_ids is not None:
        order = {job_id: i for i, job_id in enumerate(job_ids)}
        views.sort(key=lambda v: order[v.id])
    return views


def _view(row) -> JobView:
    return JobView(row.job_id, row.kind, row.product, row.status, row.done, row.failed, row.total,
                   row.model_version, row.run_date.isoformat() if row.run_date else None, row.created_at,
                   row.queued_seconds, row.run_seconds, row.error, row.median_score, row.warning)


def load_failures(job_id: int, limit: int = 100) -> tuple[list[tuple[str, str]], int]:
    """Up to `limit` (image URI, reason) of the job's failed images, and how many there are in all: a
    score job's failed results, or the training images its model version's fit could not read."""
    where = (Result.job_id == job_id, Result.status == ResultStatus.FAILED.value)
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is not None and job.kind == JobKind.FIT.value:
            return fit_failures(job, limit)
        count = session.scalar(select(func.count()).select_from(Result).where(*where))
        rows = session.execute(select(Result.image_uri, Result.error).where(*where)
                               .order_by(Result.image_uri).limit(limit)).all()
    return [(uri, error or "") for uri, error in rows], int(count or 0)


def fit_failures(job: Job, limit: int) -> tuple[list[tuple[str, str]], int]:
    """Up to `limit` (image, reason) of the training images a fit job could not read, and how many."""
    stats = (job.model_version.validation if job.model_version else None) or {}
    failed = stats.get("failed_images", [])
    # a failure recorded before failures carried their URI is named by its position in the listing
    return [(f.get("uri") or f"training image #{f['position']}", f["error"]) for f in failed[:limit]], len(failed)


def printable(text: str) -> str:
    """`text` with control characters (a newline in a review note, a terminal escape) shown escaped, so one
    cell stays on one line and cannot restyle the terminal."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else printable(str(v)) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}s"


def format_jobs(views: Sequence[JobView]) -> str:
    headers = ["id", "kind", "product", "model", "date", "status", "done/failed/total", "created",
               "queued", "ran", "note"]
    rows = [[v.id, v.kind, v.product, v.model_version and f"v{v.model_version}", v.run_date, v.status,
             f"{v.done}/{v.failed}/{v.total}", v.created_at and f"{v.created_at:%Y-%m-%d %H:%M:%S}",
             _seconds(v.queued_seconds), _seconds(v.run_seconds), _note(v)]
            for v in views]
    return format_table(headers, rows)


def _note(v: JobView) -> str:
    if v.error:
        return v.error[:120]
    return f"WARNING {v.warning[:112]}" if v.warning else ""


def format_warnings(views: Sequence[JobView]) -> str:
    """Each job's warning in full (the table cuts notes short); empty if none has one."""
    return "\n".join(f"job {v.id} ({v.product}): {printable(v.warning)}" for v in views if v.warning)


def format_failures(job_id: int, limit: int = 100) -> str:
    failures, count = load_failures(job_id, limit)
    if not count:
        return f"job {job_id}: no failed images"
    lines = [f"job {job_id}: {count} failed image(s)"]
    lines += [f"  {printable(uri)}: {printable(reason)}" for uri, reason in failures]  # names are data
    if count > len(failures):
        lines.append(f"  ... and {count - len(failures)} more")
    return "\n".join(lines)


def wait_for_jobs(job_ids: Sequence[int], poll_seconds: float = 0.25, settle_every: int = 40) -> list[JobView]:
    """Poll the jobs table (one small query by id, 4 a second) until every job has finished, showing a
    progress bar over their images. In-process, every `settle_every` polls a job that another command was
    running and left (`scheduler.jobs.fail_if_abandoned`) is marked failed, so the wait ends."""
    polls = 0
    with tqdm(total=0, unit="img", desc="waiting", dynamic_ncols=True) as bar:
        while True:
            polls += 1
            if polls % settle_every == 0:
                _settle_abandoned(job_ids)
            views = load_jobs(job_ids)
            bar.total = sum(v.total for v in views)
            bar.n = sum(v.done + v.failed for v in views)
            running = [v for v in views if not v.finished]
            bar.set_postfix_str(f"{len(views) - len(running)}/{len(views)} jobs finished", refresh=False)
            bar.refresh()
            if not running:
                return views
            time.sleep(poll_seconds)


def _settle_abandoned(job_ids: Sequence[int]) -> None:
    from scheduler.jobs import fail_if_abandoned

    if not get_settings().tasks_in_process:
        return
    for job_id in job_ids:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is not None:
                fail_if_abandoned(session, job)
