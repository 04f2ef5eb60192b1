"""Schema and migrations on SQLite and PostgreSQL: constraints, views, read-only role."""

from __future__ import annotations

import contextlib
import io
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from functools import partial

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from common.db import (
    READONLY_ROLE,
    Base,
    Job,
    JobKind,
    JobStatus,
    ModelStatus,
    ModelVersion,
    Product,
    Result,
    ResultStatus,
    Review,
    activate_model_version,
    anomaly_history,
    get_engine,
    in_transaction,
    job_summary,
    lock_product,
    make_engine,
    record_results,
    session_scope,
)
from common.engine.config import PatchCoreConfig
from common.migrate import (
    alembic_config,
    create_readonly_login,
    current_revision,
    downgrade,
    head_revision,
    readonly_url,
    upgrade,
)
from common.settings import reset_settings_cache
from scheduler import versions
from scheduler.products import SchedulingError, add_product
from scheduler.reviews import mark

TABLES = {"products", "model_versions", "jobs", "results", "reviews"}
VIEWS = {"anomaly_history", "job_summary"}


@pytest.fixture(scope="module")
def migrated_pg_url(pg_url: str) -> str:
    upgrade(pg_url)
    return pg_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated, empty database on each backend."""
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
        upgrade(url)
        yield url
        return
    yield request.getfixturevalue("clean_pg_url")


@pytest.fixture
def scheduler_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """`db_url`, made the settings' database: the one the scheduler's functions use."""
    monkeypatch.setenv("TOTALRECALL_DATABASE_URL", db_url)
    reset_settings_cache()
    return db_url


@pytest.fixture
def clean_pg_url(migrated_pg_url: str) -> Iterator[str]:
    """The module's migrated PostgreSQL database, emptied after the test."""
    yield migrated_pg_url
    with get_engine(migrated_pg_url).begin() as connection:
        connection.execute(
            sa.text("TRUNCATE results, jobs, model_versions, products RESTART IDENTITY CASCADE")
        )


def _product(session: Session, name: str | None = None) -> Product:
    product = Product(
        name=name or f"bottle-{uuid.uuid4().hex[:6]}",
        train_uri="s3://bucket/train/bottle/",
        archive_uri_template="s3://bucket/archive/{date}/bottle/",
        fit_config={"backbone": "wide_resnet50_2", "image_size": 256, "coreset_ratio": 0.1},
    )
    session.add(product)
    session.flush()
    return product


def _version(session: Session, product: Product, version: int, **kw: object) -> ModelVersion:
    values: dict[str, object] = {"status": ModelStatus.READY, "image_threshold": 0.5, "pixel_threshold": 0.4}
    values.update(kw)
    mv = ModelVersion(product=product, version=version, artifact_uri=f"s3://b/models/{version}", **values)
    session.add(mv)
    session.flush()
    return mv


def _job(session: Session, product: Product, mv: ModelVersion | None = None, **kw: object) -> Job:
    job = Job(kind=JobKind.SCORE, product=product, model_version=mv, images_uri="s3://b/archive/", **kw)
    session.add(job)
    session.flush()
    return job


def _result_row(job: Job, mv: ModelVersion, uri: str, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "job_id": job.id,
        "model_version_id": mv.id,
        "product_id": mv.product_id,
        "image_uri": uri,
        "captured_date": date(2026, 11, 27),
        "status": "ok",
        "score": 0.7,
        "threshold": 0.5,
        "is_anomalous": True,
        "mask_uri": None,
        "error": None,
    }
    row.update(kw)
    return row


# --- migrations ---------------------------------------------------------------------------------------------


def test_upgrade_sqlite_creates_schema_and_is_idempotent(sqlite_url: str) -> None:
    assert current_revision(sqlite_url) is None
    upgrade(sqlite_url)
    upgrade(sqlite_url)  # already at head: no-op
    assert current_revision(sqlite_url) == head_revision()
    inspector = sa.inspect(get_engine(sqlite_url))
    assert set(inspector.get_table_names()) >= TABLES
    assert set(inspector.get_view_names()) >= VIEWS
    with get_engine(sqlite_url).connect() as connection:
        assert connection.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(sa.text("PRAGMA foreign_keys")).scalar() == 1


# SQLite cannot reflect the expression index on lower(name): only PostgreSQL compares it (the concurrent
# registration test below shows it works on both)
SKIPS_EXPRESSION_INDEX = pytest.mark.filterwarnings("ignore:.*expression-based index")


@SKIPS_EXPRESSION_INDEX
def test_models_match_migration(db_url: str) -> None:
    """The ORM models and the migration describe the same schema (no autogenerate diff)."""
    with get_engine(db_url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


@SKIPS_EXPRESSION_INDEX
def test_constraint_names_are_the_models(db_url: str) -> None:
    """The migrated database names every constraint as the models do (autogenerate does not compare
    CHECK constraints; 0001 and 0004 had their names prefixed twice, 0006 renames them)."""
    inspector = sa.inspect(get_engine(db_url))
    for table in Base.metadata.sorted_tables:
        kinds = {sa.CheckConstraint: inspector.get_check_constraints,
                 sa.UniqueConstraint: inspector.get_unique_constraints,
                 sa.ForeignKeyConstraint: inspector.get_foreign_keys}
        for kind, reflect in kinds.items():
            expected = {c.name for c in table.constraints if isinstance(c, kind)}
            assert {c["name"] for c in reflect(table.name)} == expected, (table.name, kind.__name__)
    checks = {c["name"]: c for c in inspector.get_check_constraints("jobs")}
    assert "total >= 0" in checks["ck_jobs_counts"]["sqltext"]


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    downgrade(db_url, "base")
    inspector = sa.inspect(get_engine(db_url))
    assert not (TABLES | VIEWS) & set(inspector.get_table_names() + inspector.get_view_names())
    upgrade(db_url)  # on PostgreSQL the read-only role already exists now: must not fail
    assert current_revision(db_url) == head_revision()


def test_upgrade_names_products_differing_only_in_case(sqlite_url: str) -> None:
    """Such products predate the case-insensitive unique index: the upgrade names them, changes nothing."""
    upgrade(sqlite_url, "0006")
    with session_scope(sqlite_url) as session:
        _product(session, "Bottle")
        _product(session, "bottle")
    with pytest.raises(RuntimeError, match="differ only in case: bottle; rename or remove"):
        upgrade(sqlite_url)
    assert current_revision(sqlite_url) == "0006"


def test_offline_postgresql_sql_keeps_percent_signs() -> None:
    """`alembic upgrade head --sql` for PostgreSQL prints SQL for psql: `format('... %I ...')` as written
    (psycopg2's own paramstyle would double every '%', and psql would run the doubled text)."""
    config = alembic_config("postgresql://user@nohost/db")  # offline: never connected to
    config.output_buffer = io.StringIO()
    command.upgrade(config, "head", sql=True)
    sql = config.output_buffer.getvalue()
    assert "%I" in sql and "%%" not in sql
    assert "CREATE UNIQUE INDEX uq_products_lower_name ON products (lower(name))" in sql


# --- constraints ---------------------------------------------------------------------------------------------


def test_results_unique_per_image_and_model(db_url: str) -> None:
    with session_scope(db_url) as session:
        product = _product(session)
        mv = _version(session, product, 1)
        job = _job(session, product, mv)
        ids = (job.id, mv.id, product.id)
    with session_scope(db_url) as session:
        session.add(
            Result(
                job_id=ids[0],
                model_version_id=ids[1],
                product_id=ids[2],
                image_uri="s3://b/x 1.png",
                status="ok",
                score=0.1,
                threshold=0.5,
                is_anomalous=False,
            )
        )
    with pytest.raises(IntegrityError), session_scope(db_url) as session:
        session.add(
            Result(
                job_id=ids[0],
                model_version_id=ids[1],
                product_id=ids[2],
                image_uri="s3://b/x 1.png",
                status="ok",
                score=0.2,
                threshold=0.5,
                is_anomalous=False,
            )
        )
    with session_scope(db_url) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Result)) == 1


def test_record_results_is_exactly_once(db_url: str) -> None:
    with session_scope(db_url) as session:
        product = _product(session)
        mv = _version(session, product, 1)
        job = _job(session, product, mv)
        rows = [
            _result_row(job, mv, "s3://b/a.png", score=0.9),
            _result_row(
                job, mv, "s3://b/b.png", status="failed", score=None, is_anomalous=None, error="corrupt"
            ),
        ]
        assert record_results(session, rows) == 2
    with session_scope(db_url) as session:
        # A retried chunk: the ok result is kept as it was, the failed one is replaced by the new outcome.
        retry = [
            _result_row(job, mv, "s3://b/a.png", score=0.1, is_anomalous=False),
            _result_row(job, mv, "s3://b/b.png", score=0.2, is_anomalous=False),
        ]
        record_results(session, retry)
        assert record_results(session, []) == 0
    with session_scope(db_url) as session:
        got = {r.image_uri: (r.status, r.score, r.error) for r in session.scalars(sa.select(Result))}
    assert got == {"s3://b/a.png": ("ok", 0.9, None), "s3://b/b.png": ("ok", 0.2, None)}


def test_a_replacing_result_without_a_captured_date_keeps_the_replaced_ones(db_url: str) -> None:
    """An ad-hoc job (no date) scoring a night's failed image again: it stays in that night's history."""
    night, other = date(2026, 3, 1), date(2026, 3, 2)
    with session_scope(db_url) as session:
        product = _product(session)
        mv = _version(session, product, 1)
        job = _job(session, product, mv)
        failed = {"status": "failed", "score": None, "is_anomalous": None, "error": "corrupt"}
        record_results(session, [_result_row(job, mv, "s3://b/a.png", captured_date=night, **failed),
                                 _result_row(job, mv, "s3://b/b.png", captured_date=night, **failed)])
    with session_scope(db_url) as session:
        record_results(session, [_result_row(job, mv, "s3://b/a.png", captured_date=None),
                                 _result_row(job, mv, "s3://b/b.png", captured_date=other)])
    with session_scope(db_url) as session:
        got = {r.image_uri: (r.status, r.captured_date) for r in session.scalars(sa.select(Result))}
    assert got == {"s3://b/a.png": ("ok", night), "s3://b/b.png": ("ok", other)}


def test_record_results_takes_more_rows_than_one_statement_may_bind(sqlite_url: str) -> None:
    """A large chunk size (TOTALRECALL_CHUNK_SIZE) must not exceed the parameters one statement may bind:
    32766 in SQLite's default build (this one allows more, so the test sets the default's limit)."""
    import sqlite3

    upgrade(sqlite_url)
    with session_scope(sqlite_url) as session:
        session.connection().connection.driver_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32766)
        product = _product(session)
        mv = _version(session, product, 1)
        job = _job(session, product, mv)
        rows = [_result_row(job, mv, f"s3://b/{i}.png") for i in range(4000)]
        assert len(rows) * (len(rows[0]) + 1) > 32766  # + created_at
        assert record_results(session, rows) == 4000
    with session_scope(sqlite_url) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Result)) == 4000


def test_one_active_version_per_product(db_url: str) -> None:
    with session_scope(db_url) as session:
        product = _product(session)
        other = _product(session)
        v1 = _version(session, product, 1, is_active=True)
        _version(session, other, 1, is_active=True)  # another product may have its own active version
        _version(session, product, 2)
        product_id = product.id
    with pytest.raises(IntegrityError), session_scope(db_url) as session:
        session.add(ModelVersion(product_id=product_id, version=3, status="ready", is_active=True))
    with (
        pytest.raises(IntegrityError),
        session_scope(db_url) as session,
    ):  # version numbers unique per product
        session.add(ModelVersion(product_id=product_id, version=1, status="ready"))
    with (
        pytest.raises(IntegrityError),
        session_scope(db_url) as session,
    ):  # only a ready version may be active
        session.add(ModelVersion(product_id=product_id, version=4, status="training", is_active=True))
    with session_scope(db_url) as session:
        v2 = session.scalars(sa.select(ModelVersion).filter_by(product_id=product_id, version=2)).one()
        activate_model_version(session, v2)
    with session_scope(db_url) as session:
        active = session.scalars(
            sa.select(ModelVersion.version).filter_by(product_id=product_id, is_active=True)
        )
        assert active.all() == [2]
        assert session.get(ModelVersion, v1.id).is_active is False


@pytest.mark.integration
def test_concurrent_activations_of_one_product_do_not_collide(clean_pg_url: str) -> None:
    import threading

    with session_scope(clean_pg_url) as session:
        product = _product(session)
        _version(session, product, 1, is_active=True)
        ids = [_version(session, product, v).id for v in (2, 3)]
        product_id = product.id
    outcome: dict[str, object] = {}

    def second() -> None:  # starts while the first activation holds its transaction open
        try:
            with session_scope(clean_pg_url) as session:
                activate_model_version(session, session.get(ModelVersion, ids[1]))
            outcome["second"] = "ok"
        except Exception as exc:  # the race this guards against: a unique violation on one-active
            outcome["second"] = repr(exc)

    with session_scope(clean_pg_url) as session:
        activate_model_version(session, session.get(ModelVersion, ids[0]))
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(1.0)  # it must wait for this transaction, not pass it
        outcome["waited"] = thread.is_alive()
    thread.join(30)
    assert outcome == {"waited": True, "second": "ok"}
    with session_scope(clean_pg_url) as session:
        active = session.scalars(sa.select(ModelVersion.id).filter_by(product_id=product_id, is_active=True))
        assert active.all() == [ids[1]]


@pytest.mark.integration
def test_the_product_lock_lets_a_nights_results_be_written(clean_pg_url: str) -> None:
    """While an activation holds the product's lock, rows referencing the product are still inserted
    (their foreign key check takes FOR KEY SHARE on the product, which FOR UPDATE would block)."""
    with session_scope(clean_pg_url) as session:
        product = _product(session)
        mv = _version(session, product, 1, is_active=True)
        job = _job(session, product, mv)
        product_id, row = product.id, _result_row(job, mv, "s3://b/archive/a.png")
    with session_scope(clean_pg_url) as holder:
        lock_product(holder, product_id)
        with session_scope(clean_pg_url) as writer:
            writer.execute(sa.text("SET LOCAL lock_timeout = '2s'"))  # a blocked insert fails, not hangs
            assert record_results(writer, [row]) == 1
    with session_scope(clean_pg_url) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Result)) == 1


@pytest.mark.integration
def test_a_deadlock_is_retried_by_in_transaction(clean_pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Two transactions lock two rows in opposite orders: PostgreSQL aborts one ("deadlock detected"),
    and `in_transaction` runs it again, so both changes land."""
    import threading

    with session_scope(clean_pg_url) as session:
        ids = [_product(session).id for _ in range(2)]
    meeting = threading.Barrier(2)
    done: list[str] = []

    def lock_both(first: int, second: int, name: str) -> None:
        def work(session: Session) -> None:
            session.get(Product, first, with_for_update=True)
            with contextlib.suppress(threading.BrokenBarrierError):  # broken: this is the retry, alone
                meeting.wait(timeout=10)  # both hold their first row: the next lock closes the cycle
            session.get(Product, second, with_for_update=True).validation_uri = name
        in_transaction(work, clean_pg_url)
        done.append(name)

    threads = [threading.Thread(target=lock_both, args=(a, b, n))
               for a, b, n in ((ids[0], ids[1], "x"), (ids[1], ids[0], "y"))]
    with caplog.at_level("WARNING", logger="common.db"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(done) == ["x", "y"]
    assert any("deadlock detected" in r.getMessage() for r in caplog.records)


# --- concurrent calls of the scheduler's functions (a barrier or an event forces the interleaving) -----------


def _meet_once(barrier: threading.Barrier, prefix: str) -> Callable[[], None]:
    """Waits at `barrier` the first time each thread named `prefix...` calls it (a retry passes)."""
    met: set[str] = set()

    def meet() -> None:
        name = threading.current_thread().name
        if name.startswith(prefix) and name not in met:
            met.add(name)
            barrier.wait()

    return meet


def _run_in_threads(calls: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Runs each call in a thread of that name: {name: what it returned, or the exception it raised}."""
    outcome: dict[str, object] = {}

    def run(name: str, call: Callable[[], object]) -> None:
        try:
            outcome[name] = call()
        except Exception as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=run, args=item, name=item[0]) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcome


def test_names_differing_only_in_case_are_refused_when_registered_at_once(
        scheduler_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both registrations look the name up before either inserts: the database refuses the second, and
    it gets the look-up's message."""
    meet, look_up = _meet_once(threading.Barrier(2, timeout=10), "add-"), Session.scalar

    def looked_up(self: Session, *args: object, **kwargs: object) -> object:
        found = look_up(self, *args, **kwargs)
        meet()
        return found

    monkeypatch.setattr(Session, "scalar", looked_up)
    outcome = _run_in_threads({f"add-{name}": partial(add_product, name, "s3://b/train/", "s3://b/a/{date}/",
                                                      PatchCoreConfig()) for name in ("Bottle", "bottle")})
    refused = [v for v in outcome.values() if isinstance(v, Exception)]
    assert len(refused) == 1 and isinstance(refused[0], SchedulingError), outcome
    assert "names may not differ only in case" in str(refused[0])
    with session_scope(scheduler_db) as session:
        assert len(session.scalars(sa.select(Product.name)).all()) == 1


def test_deactivate_and_a_concurrent_activation_run_one_after_the_other(
        scheduler_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An activation that starts while `deactivate` has read the active version waits for it, then
    stands (before, it committed in between and `deactivate` reported a deactivation it never made)."""
    with session_scope(scheduler_db) as session:
        product = _product(session)
        _version(session, product, 1, is_active=True)
        _version(session, product, 2)
        name = product.name
    read, proceed, active_version = threading.Event(), threading.Event(), versions.active_version

    def read_then_pause(session: Session, product: Product) -> ModelVersion | None:
        found = active_version(session, product)
        if threading.current_thread().name == "deactivate":
            read.set()
            proceed.wait(10)
        return found

    monkeypatch.setattr(versions, "active_version", read_then_pause)
    outcome: dict[str, object] = {}
    deactivating = threading.Thread(target=lambda: outcome.update(deactivated=versions.deactivate(name)),
                                    name="deactivate")
    activating = threading.Thread(target=lambda: outcome.update(previous=versions.activate_version(name, 2)[0]))
    deactivating.start()
    assert read.wait(10)
    activating.start()
    activating.join(1.0)  # it must wait for the deactivation's transaction, not pass it
    outcome["waited"] = activating.is_alive()
    proceed.set()
    deactivating.join(30)
    activating.join(30)
    assert outcome == {"waited": True, "deactivated": 1, "previous": None}
    with session_scope(scheduler_db) as session:
        assert session.scalars(sa.select(ModelVersion.version).where(ModelVersion.is_active)).all() == [2]


def test_first_reviews_of_an_image_given_at_once_both_land(scheduler_db: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Both reviews find no verdict and add one: the later replaces the earlier (not a unique violation)."""
    uri = "s3://b/archive/x.png"
    with session_scope(scheduler_db) as session:
        product = _product(session)
        mv = _version(session, product, 1)
        record_results(session, [_result_row(_job(session, product, mv), mv, uri)])
        name = product.name
    meet, add = _meet_once(threading.Barrier(2, timeout=10), "mark-"), Session.add

    def adding(self: Session, instance: object, *args: object, **kwargs: object) -> None:
        if isinstance(instance, Review):
            meet()
        add(self, instance, *args, **kwargs)

    monkeypatch.setattr(Session, "add", adding)
    outcome = _run_in_threads({f"mark-{label}": partial(mark, name, [uri], label) for label in ("good", "defective")})
    assert all(isinstance(v, dict) for v in outcome.values()), outcome
    previous = {thread.removeprefix("mark-"): before[uri] for thread, before in outcome.items()}
    first, last = sorted(previous, key=lambda label: previous[label] is not None)
    assert (previous[first], previous[last]) == (None, first)
    with session_scope(scheduler_db) as session:
        assert session.scalars(sa.select(Review.label)).all() == [last]


def test_a_plain_postgresql_url_uses_the_installed_driver() -> None:
    engine = make_engine("postgresql://user@127.0.0.1:1/db")  # no connection is made here
    assert engine.dialect.driver == "psycopg2"
    engine.dispose()


def test_idempotency_key_unique_and_checks(db_url: str) -> None:
    with session_scope(db_url) as session:
        product = _product(session)
        mv = _version(session, product, 1)
        key = f"nightly:{product.name}:2026-11-27:{mv.version}"
        _job(session, product, mv, idempotency_key=key, run_date=date(2026, 11, 27))
        _job(session, product, mv)  # NULL keys never collide
        _job(session, product, mv)
        product_id, mv_id = product.id, mv.id
    with pytest.raises(IntegrityError), session_scope(db_url) as session:
        session.add(Job(kind="score", product_id=product_id, model_version_id=mv_id, idempotency_key=key))
    with pytest.raises(IntegrityError), session_scope(db_url) as session:
        session.add(Job(kind="train", product_id=product_id))
    with pytest.raises(IntegrityError), session_scope(db_url) as session:
        session.add(Job(kind="fit", product_id=product_id, status="done"))
    with pytest.raises(IntegrityError), session_scope(db_url) as session:
        session.add(Job(kind="fit", product_id=product_id + 1000))  # foreign keys enforced (SQLite too)


def test_timestamps_are_utc_aware(db_url: str) -> None:
    with session_scope(db_url) as session:
        job = _job(session, _product(session))
        job.started_at = datetime(2026, 11, 27, 3, 0, tzinfo=UTC) + timedelta(microseconds=5)
        job_id = job.id
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        assert job.created_at.tzinfo is not None and job.started_at == datetime(2026, 11, 27, 3, 0, 0, 5, UTC)
        with pytest.raises(Exception, match="naive"):
            job.finished_at = datetime(2026, 11, 27)
            session.flush()
        session.rollback()


# --- views ----------------------------------------------------------------------------------------------------


def test_views_return_rows(db_url: str) -> None:
    start = datetime(2026, 11, 27, 2, 0, tzinfo=UTC)
    with session_scope(db_url) as session:
        product = _product(session, name="bottle")
        mv = _version(session, product, 3)
        job = _job(
            session,
            product,
            mv,
            status=JobStatus.SUCCEEDED,
            total=3,
            done=3,
            failed=1,
            run_date=date(2026, 11, 27),
            created_at=start,
            started_at=start + timedelta(seconds=30),
            finished_at=start + timedelta(seconds=90),
            enqueued_by="scheduler",
        )
        record_results(
            session,
            [
                _result_row(job, mv, "s3://b/a.png", is_anomalous=True, mask_uri="s3://b/masks/a.png"),
                _result_row(job, mv, "s3://b/b.png", is_anomalous=False, score=0.1),
                _result_row(
                    job,
                    mv,
                    "s3://b/c.png",
                    status=ResultStatus.FAILED,
                    score=None,
                    is_anomalous=None,
                    error="not an image",
                ),
            ],
        )
        job_id = job.id
    with get_engine(db_url).connect() as connection:
        history = connection.execute(sa.select(anomaly_history).order_by(anomaly_history.c.image_uri)).all()
        summary = connection.execute(sa.select(job_summary)).one()
    assert [(r.image_uri, r.verdict, r.model_version, r.product) for r in history] == [
        ("s3://b/a.png", "anomalous", 3, "bottle"),
        ("s3://b/b.png", "ok", 3, "bottle"),
        ("s3://b/c.png", "failed", 3, "bottle"),
    ]
    assert history[0].mask_uri == "s3://b/masks/a.png" and history[2].error == "not an image"
    assert history[0].captured_date == date(2026, 11, 27) and history[0].job_id == job_id
    assert (summary.job_id, summary.kind, summary.product, summary.status) == (
        job_id,
        "score",
        "bottle",
        "succeeded",
    )
    assert (summary.total, summary.done, summary.failed, summary.model_version) == (3, 3, 1, 3)
    assert summary.queued_seconds == pytest.approx(30, abs=0.01)
    assert summary.run_seconds == pytest.approx(60, abs=0.01)


# --- PostgreSQL read-only role ------------------------------------------------------------------------------


@pytest.mark.integration
def test_readonly_login_reads_views_only(clean_pg_url: str) -> None:
    migrated_pg_url = clean_pg_url
    with session_scope(migrated_pg_url) as session:
        product = _product(session)
        mv = _version(session, product, 1)
        job = _job(session, product, mv)
        record_results(session, [_result_row(job, mv, "s3://b/ro.png")])
        ids = (job.id, mv.id, product.id)
    password = f"ro-{uuid.uuid4().hex}'%:@"  # quoting-hostile characters on purpose
    create_readonly_login(migrated_pg_url, password)
    engine = sa.create_engine(readonly_url(migrated_pg_url, password))
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT current_user")).scalar() == READONLY_ROLE
            rows = connection.execute(sa.text("SELECT image_uri, verdict FROM anomaly_history")).all()
            assert ("s3://b/ro.png", "anomalous") in rows
            connection.execute(sa.text("SELECT count(*), max(warning), max(median_score) FROM job_summary")).one()
        insert = (
            "INSERT INTO results (job_id, model_version_id, product_id, image_uri, status) "
            "VALUES (:job, :mv, :product, 's3://b/evil.png', 'ok')"
        )
        for statement in (
            insert,
            "SELECT * FROM results",
            "UPDATE jobs SET status = 'failed'",
            "CREATE TABLE sneaky (id int)",
        ):
            with engine.connect() as connection, pytest.raises(DBAPIError, match="permission denied"):
                connection.execute(sa.text(statement), {"job": ids[0], "mv": ids[1], "product": ids[2]})
    finally:
        engine.dispose()
    with pytest.raises(ValueError):
        create_readonly_login(migrated_pg_url, "")


@pytest.mark.integration
def test_db_upgrade_applies_the_readonly_password(clean_pg_url: str, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    from totalrecall.cli import main

    password = f"ro-{uuid.uuid4().hex}"
    monkeypatch.setenv("TOTALRECALL_DATABASE_URL", clean_pg_url)
    monkeypatch.setenv("TOTALRECALL_READONLY_PASSWORD", password)
    reset_settings_cache()
    assert main(["db", "upgrade"]) == 0
    assert f"role {READONLY_ROLE} can log in" in capsys.readouterr().out
    engine = sa.create_engine(readonly_url(clean_pg_url, password))
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM anomaly_history")).scalar() == 0
    finally:
        engine.dispose()


@pytest.mark.integration
def test_db_upgrade_by_a_user_who_cannot_change_roles_warns_and_succeeds(
        pg_server_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The read-only role is the cluster's, maybe created by another user: a migrating user without
    CREATEROLE upgrades the schema and is told why the login was not set (it crashed after migrating)."""
    from common.db import dispose_engines, execute_autocommit, fresh_database
    from totalrecall.cli import main

    user, password = f"tr_owner_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    execute_autocommit(pg_server_url, f"CREATE ROLE {user} LOGIN PASSWORD '{password}' NOCREATEROLE",
                       f"GRANT {user} TO CURRENT_USER")  # to hand it a database
    try:
        with fresh_database(pg_server_url, "tr_norole") as url:
            execute_autocommit(pg_server_url, f'ALTER DATABASE "{sa.make_url(url).database}" OWNER TO {user}')
            owner_url = sa.make_url(url).set(username=user, password=password).render_as_string(hide_password=False)
            monkeypatch.setenv("TOTALRECALL_DATABASE_URL", owner_url)
            monkeypatch.setenv("TOTALRECALL_READONLY_PASSWORD", "ro-pw")
            reset_settings_cache()
            assert main(["db", "upgrade"]) == 0
            out, err = capsys.readouterr()
            assert "is at revision" in out
            assert f"warning: the schema is upgraded, but role {READONLY_ROLE} was not given its login" in err
            assert "permission denied" in err.lower() or "must have CREATEROLE" in err
            dispose_engines(owner_url)
    finally:
        execute_autocommit(pg_server_url, f"DROP ROLE IF EXISTS {user}")


def test_readonly_login_is_postgres_only(sqlite_url: str) -> None:
    with pytest.raises(NotImplementedError):
        create_readonly_login(sqlite_url, "pw")


def test_json_columns_round_trip_and_none_is_sql_null(db_url: str) -> None:
    with session_scope(db_url) as session:
        product = _product(session)
        mv = _version(session, product, 1, validation=None, config={"backbone": "x", "layers": [2, 3]})
        mv_id = mv.id
    with session_scope(db_url) as session:
        assert session.get(ModelVersion, mv_id).config == {"backbone": "x", "layers": [2, 3]}
        null_validation = sa.select(ModelVersion.id).where(
            ModelVersion.validation.is_(None), ModelVersion.product_id == product.id
        )
        assert session.scalar(null_validation) == mv_id
        fit = session.scalar(sa.select(Product.fit_config).where(Product.id == product.id))
        assert fit["coreset_ratio"] == 0.1
