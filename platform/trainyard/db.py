"""Engine, sessions and schema management for the platform database (SQLite or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from trainyard.errors import SchemaOutOfDate

# The repository keeps migrations/ beside platform/; an editable install (what `make up` does) finds it here.
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets the web process read while a worker writes; busy_timeout turns a brief lock into a wait.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def create_db_engine(url: str, *, pool_size: int = 5, max_overflow: int = 10) -> Engine:
    """An engine for `url`; SQLite files get their folder created and WAL mode.

    No pre-ping: it would cost a round trip on every checkout. A connection the server dropped fails its
    first statement instead; SQLAlchemy then replaces every pooled connection as it is next checked out, and
    the callers retry (web GETs once, workers' writes with backoff). `pool_recycle` retires connections that
    a firewall or PgBouncer may have closed quietly.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args = {}
    if parsed.get_backend_name() == "postgresql":
        # Bounded connects and TCP keepalives: a server that vanished without closing its sockets (a network
        # partition, a dead host) shows up as an error the callers retry, not as a heartbeat blocked for hours.
        # No server-side prepared statements: behind PgBouncer in transaction mode (docker-compose.yml) the
        # next statement may reach another server connection that never saw the PREPARE.
        connect_args = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                        "keepalives_count": 3, "prepare_threshold": None}
    return create_engine(url, pool_size=pool_size, max_overflow=max_overflow, pool_recycle=1800,
                         connect_args=connect_args)


class Database:
    """One engine and its session factories: `session_scope()` for a transaction, `read_scope()` for
    statements that stand alone, `connection()` for the hot statements of `trainyard.statements`; services
    touch the database through these only.

    Inside `request_scope()` (one web request), `read_scope()` and `connection()` share the request's one
    connection, so authentication and the view read on it and no BEGIN/COMMIT is sent for reads.
    """

    def __init__(self, url: str, *, pool_size: int = 5, max_overflow: int = 10) -> None:
        self.url = url
        self.engine = create_db_engine(url, pool_size=pool_size, max_overflow=max_overflow)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # The same pool in autocommit mode (a client-side switch on checkout, no round trip): a read sends only
        # its SELECT, and a single-statement write (the claim, a heartbeat) commits as it runs.
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._statements = sessionmaker(self._autocommit, expire_on_commit=False)
        self._request: ContextVar[_RequestConnection | None] = ContextVar(
            f"trainyard-request-connection-{id(self)}", default=None)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """A session that commits on success, rolls back on error and always closes."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def read_scope(self) -> Iterator[Session]:
        """A session in autocommit mode: each statement commits on its own, so use it for reads and for a
        write that is one statement. Inside `request_scope()` it is the request's session."""
        shared = self._request.get()
        if shared is not None:
            yield shared.session()
            return
        session = self._statements()
        try:
            yield session
        finally:
            session.close()

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """An autocommit connection for `trainyard.statements`; inside `request_scope()`, the request's."""
        shared = self._request.get()
        if shared is not None:
            yield shared.connection()
            return
        with self._autocommit.connect() as conn:
            yield conn

    @contextmanager
    def request_scope(self) -> Iterator[None]:
        """One connection, checked out when first used, for everything `read_scope()` and `connection()` do
        until the block ends (a web request)."""
        shared = _RequestConnection(self._autocommit)
        token = self._request.set(shared)
        try:
            yield
        finally:
            self._request.reset(token)
            shared.close()

    def dispose(self) -> None:
        self.engine.dispose()


class _RequestConnection:
    """A web request's connection (autocommit), and a session bound to it, each made when first asked for."""

    __slots__ = ("_engine", "_connection", "_session")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: Connection | None = None
        self._session: Session | None = None

    def connection(self) -> Connection:
        if self._connection is None or self._connection.invalidated:
            if self._connection is not None:
                self.close()
            self._connection = self._engine.connect()
        return self._connection

    def session(self) -> Session:
        if self._session is None:
            self._session = Session(bind=self.connection(), expire_on_commit=False)
        return self._session

    def close(self) -> None:
        session, connection = self._session, self._connection
        self._session = self._connection = None
        try:
            if session is not None:
                session.close()
        finally:
            if connection is not None:
                connection.close()


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would choke on a '%' in a password.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_schema(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` to `revision` (creating a SQLite file if needed)."""
    create_db_engine(url).dispose()  # creates the SQLite folder
    command.upgrade(alembic_config(url), revision)


def downgrade_schema(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """(the database's current revision, the migrations' single head)."""
    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if head is None:
        raise RuntimeError(f"no Alembic revisions found in {MIGRATIONS_DIR}")
    return current, head


def check_schema(db: Database) -> None:
    """Refuse to run against a schema that is not at the migrations' head."""
    current, head = schema_revisions(db.engine)
    if current != head:
        where = f"at revision {current}" if current else "not initialised"
        raise SchemaOutOfDate(
            f"The platform database ({db.engine.url.render_as_string(hide_password=True)}) is {where}; "
            f"this version of Trainyard needs revision {head}. Run `trainyard db upgrade`."
        )
