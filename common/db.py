"""Database models (SQLAlchemy 2) and engine/session helpers, for SQLite and PostgreSQL.

The schema itself is created by the Alembic migrations in `migrations/` (`common.migrate.upgrade`), never
by `metadata.create_all`; the models here must match them (tests compare the two).

Invariants the schema enforces:
- `results` has UNIQUE (image_uri, model_version_id): scoring an image with a model is recorded once,
  however often a chunk is retried (`record_results` upserts accordingly).
- At most one active `model_versions` row per product (partial unique index), and only a `ready`
  version may be active.
- `jobs.idempotency_key` is unique, so two schedulers racing to enqueue the same nightly run create one job.
- `reviews` has UNIQUE (product_id, image_uri): an image carries one operator verdict, the latest.
- Product names are unique regardless of case (unique index on lower(name)).

Timestamps are timezone-aware UTC datetimes in Python (SQLite stores them as naive UTC text).

Database outages: a new PostgreSQL connection is retried while the server is unreachable or restarting
(`TOTALRECALL_DB_RETRY_SECONDS`), and pooled connections are checked before use (pre-ping), so a session
opened after a restart just waits for the server. A transaction that loses its connection half-way is
re-run by `in_transaction`; wrong credentials or SQL errors are never retried.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    false,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.types import JSON

from common.logs import log_event
from common.per_process import PerProcess
from common.settings import get_settings, redact_text

logger = logging.getLogger(__name__)
T = TypeVar("T")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on PostgreSQL (indexable, compact), JSON text elsewhere; Python None is SQL NULL, not JSON null.
JSONType = JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
# 64-bit ids on PostgreSQL; SQLite only auto-increments a column declared exactly INTEGER.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class ModelStatus(StrEnum):
    TRAINING = "training"
    READY = "ready"
    FAILED = "failed"


class JobKind(StrEnum):
    FIT = "fit"
    SCORE = "score"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)  # a job whose work may still come


class ResultStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"


class ReviewLabel(StrEnum):
    GOOD = "good"
    DEFECTIVE = "defective"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite has no time zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONType, datetime: UTCDateTime}


class Product(Base):
    """A product line: where its training images and its daily archives live, and how to fit it."""

    __tablename__ = "products"
    # Names become storage keys, and "P2" and "p2" would share files on case-insensitive disks. An
    # expression index: SQLite cannot reflect it, so only PostgreSQL compares it with the migration.
    __table_args__ = (UniqueConstraint("name"), Index("uq_products_lower_name", text("lower(name)"), unique=True))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    train_uri: Mapped[str] = mapped_column(Text)
    archive_uri_template: Mapped[str] = mapped_column(Text)  # contains "{date}" (YYYY-MM-DD)
    # labelled validation images (good/, <defect type>/, ground_truth/): F1-optimal thresholds at each fit
    validation_uri: Mapped[str | None] = mapped_column(Text)
    # with validation images: the image threshold flags at most this fraction of nominal ones (None: F1)
    max_false_alarms: Mapped[float | None] = mapped_column(Float)
    # an image whose white pixels are the part of every image inspected (`common.engine.roi`); None: all
    roi_uri: Mapped[str | None] = mapped_column(Text)
    fit_config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # backbone, image_size, coreset_ratio...
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())

    model_versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="product", order_by="ModelVersion.version"
    )

    def archive_uri(self, day: date) -> str:
        return self.archive_uri_template.replace("{date}", day.isoformat())


class ModelVersion(Base):
    """One fitted PatchCore model of a product; its artifact lives in storage at `artifact_uri`."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("product_id", "version"),
        CheckConstraint(_in("status", ModelStatus), name="status"),
        CheckConstraint("NOT is_active OR status = 'ready'", name="active_is_ready"),
        Index(
            "uq_model_versions_one_active",
            "product_id",
            unique=True,
            postgresql_where=text("is_active"),
            sqlite_where=text("is_active"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    version: Mapped[int] = mapped_column(Integer)
    artifact_uri: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    image_threshold: Mapped[float | None] = mapped_column(Float)
    pixel_threshold: Mapped[float | None] = mapped_column(Float)
    # median image score of the nominal images held out at fit time: where a stable process's scores sit,
    # the reference of the score-drift check (`common.drift`)
    nominal_median_score: Mapped[float | None] = mapped_column(Float)
    train_image_count: Mapped[int | None] = mapped_column(Integer)
    validation: Mapped[dict[str, Any] | None] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.TRAINING.value)
    is_active: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    error: Mapped[str | None] = mapped_column(Text)

    product: Mapped[Product] = relationship(back_populates="model_versions")


class Job(Base):
    """A fit or score run, with progress counters the workers advance chunk by chunk."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("idempotency_key"),
        CheckConstraint(_in("kind", JobKind), name="kind"),
        CheckConstraint(_in("status", JobStatus), name="status"),
        CheckConstraint("total >= 0 AND done >= 0 AND failed >= 0", name="counts"),
        Index("ix_jobs_product_id_created_at", "product_id", "created_at"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value, server_default="queued")
    total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    images_uri: Mapped[str | None] = mapped_column(Text)
    run_date: Mapped[date | None] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    median_score: Mapped[float | None] = mapped_column(Float)  # score jobs: median image score, at the end
    warning: Mapped[str | None] = mapped_column(Text)  # e.g. score drift (`common.drift`); the job succeeded
    enqueued_by: Mapped[str | None] = mapped_column(String(200))
    # e.g. "nightly:<product>:<date>:<model_version>"; NULL for ad-hoc jobs (NULLs never collide).
    idempotency_key: Mapped[str | None] = mapped_column(String(255))

    product: Mapped[Product] = relationship()
    model_version: Mapped[ModelVersion | None] = relationship()


class Result(Base):
    """The verdict for one image under one model version (exactly once: see the unique constraint)."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("image_uri", "model_version_id"),
        CheckConstraint(_in("status", ResultStatus), name="status"),
        Index("ix_results_product_id_captured_date", "product_id", "captured_date"),
        Index("ix_results_job_id", "job_id"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    job_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("jobs.id"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    image_uri: Mapped[str] = mapped_column(Text)
    captured_date: Mapped[date | None] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(16))
    score: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    is_anomalous: Mapped[bool | None] = mapped_column(Boolean)
    mask_uri: Mapped[str | None] = mapped_column(Text)
    heatmap_uri: Mapped[str | None] = mapped_column(Text)
    defect_fraction: Mapped[float | None] = mapped_column(Float)
    max_y: Mapped[int | None] = mapped_column(Integer)
    max_x: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class Review(Base):
    """An operator's verdict on one scored image of a product (`scheduler.reviews`). It changes no result;
    images reviewed `good` join the memory bank of the product's next fit (false alarms it learns from)."""

    __tablename__ = "reviews"
    __table_args__ = (
        UniqueConstraint("product_id", "image_uri"),
        CheckConstraint(_in("label", ReviewLabel), name="label"),
        CheckConstraint("defect_type IS NULL OR label = 'defective'", name="defect_type_if_defective"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    image_uri: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column(String(16))
    defect_type: Mapped[str | None] = mapped_column(String(200))
    note: Mapped[str | None] = mapped_column(Text)
    reviewed_by: Mapped[str | None] = mapped_column(String(200))
    reviewed_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


# Read-only reporting views (created by the migration). Separate metadata: never created or diffed as tables.
views_metadata = MetaData()
anomaly_history = Table(
    "anomaly_history",
    views_metadata,
    Column("product", String),
    Column("captured_date", Date),
    Column("image_uri", Text),
    Column("score", Float),
    Column("threshold", Float),
    Column("verdict", String),  # 'anomalous' | 'ok' | 'failed'
    Column("model_version", Integer),
    Column("mask_uri", Text),
    Column("error", Text),
    Column("job_id", BigInteger),
    Column("created_at", UTCDateTime),
    Column("review", String),  # the operator's verdict on the image: 'good' | 'defective' | NULL
    Column("defect_type", String),  # the reviewer's defect type, for 'defective'
)
job_summary = Table(
    "job_summary",
    views_metadata,
    Column("job_id", BigInteger),
    Column("kind", String),
    Column("product", String),
    Column("status", String),
    Column("total", Integer),
    Column("done", Integer),
    Column("failed", Integer),
    Column("run_date", Date),
    Column("model_version", Integer),
    Column("enqueued_by", String),
    Column("created_at", UTCDateTime),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("queued_seconds", Float),  # started_at - created_at
    Column("run_seconds", Float),  # finished_at - started_at
    Column("error", Text),
    Column("median_score", Float),
    Column("warning", Text),
)
READONLY_ROLE = "totalrecall_readonly"  # PostgreSQL role allowed to SELECT the two views only


# --- engines and sessions -------------------------------------------------------------------------------

# in a forked child, the parent's engines are dropped without closing the parent's connections
_engines: PerProcess[str, Engine] = PerProcess(forget=lambda engine: engine.dispose(close=False))


def parse_database_url(url: str) -> URL:
    """`url` parsed; a plain `postgresql://` gets psycopg2, the driver this project installs (SQLAlchemy
    2.1 would otherwise pick psycopg 3, which is not installed)."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg2") if parsed.drivername == "postgresql" else parsed


def make_engine(url: str, **kwargs: Any) -> Engine:
    """A new engine for `url` (uncached): pre-ping; SQLite gets WAL, foreign keys and a busy timeout."""
    parsed = parse_database_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            _sqlite_folder(Path(database).absolute().parent)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", 30)
        engine = create_engine(parsed, pool_pre_ping=True, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql":
        connect_args = kwargs.setdefault("connect_args", {})
        connect_args.setdefault("connect_timeout", 10)
        connect_args.setdefault("application_name", "totalrecall")
        engine = create_engine(parsed, pool_pre_ping=True, **kwargs)
        event.listen(engine, "do_connect", _connect_retrying)
        return engine
    raise ValueError(f"database {parsed.get_backend_name()!r} is not supported (TOTALRECALL_DATABASE_URL): use "
                     "postgresql://USER:PASSWORD@HOST/DB or sqlite:///PATH")


def _sqlite_folder(folder: Path) -> None:
    """Create the embedded default's home; any other SQLite database's folder must exist already (a
    mistyped TOTALRECALL_DATABASE_URL would otherwise start an empty database somewhere unexpected)."""
    if folder == get_settings().home:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        raise FileNotFoundError(f"the SQLite database's folder {folder} does not exist: create it, or "
                                f"correct TOTALRECALL_DATABASE_URL")


# Lower-case fragments of driver messages that mean "unreachable, restarting or dropped: try again".
# Authentication failures, missing databases and SQL errors are deliberately absent.
_TRANSIENT_DB_MESSAGES = (
    "connection refused",
    "could not connect",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "timeout expired",
    "server closed the connection",
    "terminating connection",
    "connection reset",
    "could not receive data",
    "could not send data",
    "no connection to the server",
    "connection already closed",
    "connection has been closed",
    "too many clients",
    "ssl syscall error",
    "connection timed out",
    "network is unreachable",
    "broken pipe",
    "database is locked",
    "deadlock detected",  # PostgreSQL aborted one of two transactions that waited on each other
)


def is_transient_db_error(exc: BaseException) -> bool:
    """True if `exc` means the database was unreachable or dropped the connection (worth retrying)."""
    from sqlalchemy.exc import DBAPIError, DisconnectionError

    if isinstance(exc, DisconnectionError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    if not names & {"OperationalError", "InterfaceError"}:
        return False
    text = str(getattr(exc, "orig", None) or exc).lower()
    return any(fragment in text for fragment in _TRANSIENT_DB_MESSAGES)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return redact_text(text.splitlines()[0] if text else type(exc).__name__)


def _connect_retrying(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
    """`do_connect` hook: open a DBAPI connection, waiting while the server is down or restarting."""
    deadline = time.monotonic() + get_settings().db_retry_seconds
    delay = 0.25
    while True:
        try:
            return dialect.connect(*cargs, **cparams)
        except Exception as exc:
            if not is_transient_db_error(exc) or time.monotonic() + delay > deadline:
                raise
            log_event(logger, logging.WARNING, "database_unreachable", error=_first_line(exc), retry_in_s=delay)
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")  # ms to wait for a lock held by another process
    cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL
    cursor.close()


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for `url` (default: settings' database URL)."""
    url = url or get_settings().database_url
    return _engines.get(url, lambda: make_engine(url))


def dispose_engines(url: str | None = None) -> None:
    """Close pooled connections of cached engines (all, or the one for `url`) and forget them."""
    for key in [url] if url is not None else _engines.keys():
        engine = _engines.pop(key)
        if engine is not None:
            engine.dispose()


# --- server administration (tests, benchmarks) -----------------------------------------------------------


def execute_autocommit(server_url: str, *statements: str) -> None:
    """Run admin statements that cannot run in a transaction (CREATE/DROP DATABASE) on a connection of
    their own, closed afterwards (so it works after a server restart)."""
    from sqlalchemy.pool import NullPool

    engine = create_engine(parse_database_url(server_url), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as connection:
            for statement in statements:
                connection.execute(text(statement))
    finally:
        engine.dispose()


@contextlib.contextmanager
def fresh_database(server_url: str, prefix: str = "tr") -> Iterator[str]:
    """URL of a new, empty PostgreSQL database on the server of `server_url`, dropped afterwards (with
    FORCE); a failed drop (e.g. the server is down) is a warning, not an error."""
    if not prefix.isidentifier() or not prefix.isascii():
        raise ValueError(f"database name prefix must be a plain identifier, not {prefix!r}")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"  # a new identifier of ours: safe to put in the DDL
    execute_autocommit(server_url, f'CREATE DATABASE "{name}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        dispose_engines(url)
        try:
            execute_autocommit(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:
            warnings.warn(f"could not drop database {name}: {redact_text(str(exc))}", stacklevel=3)


@contextlib.contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error; objects stay usable after it closes."""
    session = sessionmaker(bind=get_engine(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def in_transaction(work: Callable[[Session], T], url: str | None = None) -> T:
    """`work(session)` in one transaction, run again if the connection failed half-way (transiently).

    Retries for up to `TOTALRECALL_DB_RETRY_SECONDS`; `work` must be safe to run twice (an error during
    COMMIT leaves it unknown whether the first run was committed).
    """
    deadline = time.monotonic() + get_settings().db_retry_seconds
    delay = 0.5
    while True:
        try:
            with session_scope(url) as session:
                return work(session)
        except Exception as exc:
            if not is_transient_db_error(exc) or time.monotonic() + delay > deadline:
                raise
            log_event(logger, logging.WARNING, "database_transaction_interrupted", error=_first_line(exc),
                      retry_in_s=delay)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


# --- write helpers the invariants call for ----------------------------------------------------------------

_RESULT_UPDATABLE = (
    "job_id",
    "captured_date",
    "status",
    "score",
    "threshold",
    "is_anomalous",
    "mask_uri",
    "heatmap_uri",
    "defect_fraction",
    "max_y",
    "max_x",
    "error",
    "created_at",
)


def record_results(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Insert result rows exactly once per (image_uri, model_version_id); returns rows written.

    All rows must have the same keys (one multi-row INSERT ... ON CONFLICT statement).

    A retried chunk is harmless: an existing `ok` result is never overwritten, while an existing `failed`
    one is replaced (a retry may succeed where the first attempt failed). A replacing row without a
    captured date (an ad-hoc job's) keeps the replaced one's: the image stays in its night's history.
    """
    if not rows:
        return 0
    rows = [{"created_at": utcnow(), **row} for row in rows]
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"record_results does not support {dialect}")
    written = 0
    per_row = len(rows[0]) + 1  # and the statement's own few
    for part in in_chunks(rows, MAX_STATEMENT_PARAMETERS // per_row):  # a large chunk size works too
        stmt = insert(Result).values(list(part))
        stmt = stmt.on_conflict_do_update(
            index_elements=["image_uri", "model_version_id"],
            set_={name: func.coalesce(stmt.excluded[name], Result.captured_date) if name == "captured_date"
                  else stmt.excluded[name] for name in _RESULT_UPDATABLE if name in rows[0]},
            where=Result.status == ResultStatus.FAILED.value,
        )
        written += session.execute(stmt).rowcount
    return written


# Parameters of one statement, under every backend's cap (SQLite's default build 32766; psycopg2
# binds on the client)
MAX_STATEMENT_PARAMETERS = 30_000


def in_chunks(items: Sequence[T], size: int = 500) -> Iterator[Sequence[T]]:
    """Bounded IN lists (or VALUES lists): backends cap the parameters of one statement."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def images_with_results(session: Session, model_version_id: int, image_uris: Sequence[str],
                        ok_only: bool = False) -> set[str]:
    """Those of `image_uris` that already have a result (or only an `ok` one) for the model version."""
    found: set[str] = set()
    for part in in_chunks(image_uris):
        query = select(Result.image_uri).where(
            Result.model_version_id == model_version_id,
            Result.image_uri.in_(part),
        )
        if ok_only:
            query = query.where(Result.status == ResultStatus.OK.value)
        found.update(session.scalars(query))
    return found


def date_scored(session: Session, model_version_id: int, image_uris: Sequence[str], day: date) -> None:
    """Give `day` as the captured date to those of the images' results for the version that have none:
    images of a night's archive folder that an ad-hoc job scored before the nightly came to them."""
    for part in in_chunks(image_uris):
        session.execute(update(Result).where(
            Result.model_version_id == model_version_id,
            Result.image_uri.in_(part),
            Result.captured_date.is_(None),
        ).values(captured_date=day).execution_options(synchronize_session=False))


def activate_model_version(session: Session, version: ModelVersion) -> None:
    """Make `version` its product's only active version (deactivate the others first, then flush).

    The product's row is locked first (`lock_product`), so two activations of one product run one after
    the other instead of both passing the deactivation and colliding on the one-active-version index."""
    if version.status != ModelStatus.READY:
        raise ValueError(
            f"model version {version.version} is {version.status}, only a ready one can be active"
        )
    lock_product(session, version.product_id)
    session.execute(
        update(ModelVersion)
        .where(
            ModelVersion.product_id == version.product_id,
            ModelVersion.id != version.id,
            ModelVersion.is_active,
        )
        .values(is_active=False)
        .execution_options(synchronize_session="fetch")
    )
    version.is_active = True
    session.flush()


def lock_product(session: Session, product_id: int) -> None:
    """Lock the product's row until the transaction ends: what changes which of its versions is active
    takes this lock first, so such changes run one after the other and read what the previous committed.

    SQLite has no row locks, and Python's sqlite3 begins a transaction only at the first write: a write
    comes first there, taking SQLite's one write lock for the whole transaction (as `workers.job_state`
    does for jobs).

    On PostgreSQL the lock is FOR NO KEY UPDATE: it excludes other holders of this lock, while the rows
    that reference the product (a night's results and jobs, whose foreign keys take FOR KEY SHARE) are
    still written meanwhile."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Product).where(Product.id == product_id).values(name=Product.name)
                        .execution_options(synchronize_session=False))
    session.execute(select(Product.id).where(Product.id == product_id).with_for_update(key_share=True))
