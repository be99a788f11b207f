"""API tokens and roles: who may do what.

A token is `ty_` plus 256 random bits. Only its sha256 is stored (a fast hash is enough for a secret of
that entropy; passwords would need a slow one), so a leaked database leaks no usable token. Every token
has an expiry and can be revoked; its role is one of `viewer` < `member` < `admin`.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import bindparam, select, update

from trainyard.db import Database
from trainyard.errors import Conflict, Forbidden, InvalidSpec, NotFound, Unauthorized
from trainyard.models import ApiToken, to_view, utcnow
from trainyard.statements import Statement

TOKEN_PREFIX = "ty_"
BOOTSTRAP_USER = "admin"
USER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
MAX_EXPIRY_DAYS = 3650
PROTECTED_ALIASES = frozenset({"production"})  # only an admin moves these
LAST_USED_RESOLUTION = timedelta(minutes=1)  # don't write on every request just to say "still used"


class Role(enum.StrEnum):
    VIEWER = "viewer"  # read everything
    MEMBER = "member"  # + submit, cancel/retry own jobs, register datasets, predict, move non-protected aliases
    ADMIN = "admin"  # + everyone's jobs, the `production` alias, tokens

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's user and role."""

    user: str
    role: Role
    token_id: int

    def require(self, needed: Role, doing: str) -> None:
        if not self.role.allows(needed):
            raise Forbidden(f"{doing} needs the {needed} role; {self.user}'s token has {self.role}.")

    def may_act_for(self, owner: str | None) -> bool:
        return self.role is Role.ADMIN or (owner is not None and owner == self.user)


def check_alias_move(principal: Principal, alias: str) -> None:
    """Members move aliases like `staging`; only an admin moves `production`."""
    if alias in PROTECTED_ALIASES:
        principal.require(Role.ADMIN, f"Moving the {alias} alias")


@dataclass
class TokenView:
    id: int
    user: str
    role: str
    name: str
    prefix: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and self.expires_at > utcnow()


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(db: Database, *, user: str, role: str, created_by: str, name: str = "",
                 expires_in_days: int = 90) -> tuple[TokenView, str]:
    """Store a new token and return it with its secret, which is never shown again."""
    if not USER_PATTERN.match(user or ""):
        raise InvalidSpec("user: 1-100 characters of letters, digits, '_', '.', '@' or '-'.",
                          errors=[{"field": "user", "message": "invalid user name"}])
    try:
        role_ = Role(role)
    except ValueError:
        raise InvalidSpec(f"role: choose one of {', '.join(Role)}.",
                          errors=[{"field": "role", "message": "unknown role"}]) from None
    if not 1 <= expires_in_days <= MAX_EXPIRY_DAYS:
        raise InvalidSpec(f"expires_in_days: between 1 and {MAX_EXPIRY_DAYS}.",
                          errors=[{"field": "expires_in_days", "message": "out of range"}])
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    with db.session_scope() as s:
        row = ApiToken(user=user, role=role_, name=name[:200], token_hash=hash_token(secret),
                       prefix=secret[:10], created_by=created_by, created_at=now,
                       expires_at=now + timedelta(days=expires_in_days))
        s.add(row)
        s.flush()
        return to_view(TokenView, row), secret


def authenticate(db: Database, secret: str) -> Principal:
    """The principal a bearer secret stands for; 401 for a missing, unknown, expired or revoked one."""
    if not secret:
        raise Unauthorized("Send a token: `Authorization: Bearer <token>` (see `trainyard tokens create`).")
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        raise Unauthorized("That is not a Trainyard token.")
    return _principal_of(db, _TOKEN_BY_HASH, token_hash=hash_token(secret))


def principal_for_token(db: Database, token_id: int) -> Principal:
    """The principal behind a token id (a UI session remembers the id, never the secret)."""
    if not 0 < token_id < 2**63:
        raise Unauthorized("Unknown token.")
    return _principal_of(db, _TOKEN_BY_ID, token_id=token_id)


def _principal_of(db: Database, lookup: Statement, **params) -> Principal:
    """The principal of the token row `lookup` finds, stamping its last use at most once a minute. On a web
    request's connection: the view reads on it too."""
    with db.connection() as conn:
        row = lookup.first(conn, **params)
        principal = _principal(row)
        if row.last_used_at is None or utcnow() - row.last_used_at > LAST_USED_RESOLUTION:
            _TOUCH_TOKEN.rowcount(conn, token_id=row.id, now=utcnow())
        return principal


_TOKEN_COLUMNS = [ApiToken.__table__.c[name] for name in
                  ("id", "user", "role", "prefix", "revoked_at", "expires_at", "last_used_at")]
_TOKEN_BY_HASH = Statement("token_by_hash", select(*_TOKEN_COLUMNS).where(
    ApiToken.__table__.c.token_hash == bindparam("token_hash")))
_TOKEN_BY_ID = Statement("token_by_id", select(*_TOKEN_COLUMNS).where(
    ApiToken.__table__.c.id == bindparam("token_id")))
_TOUCH_TOKEN = Statement("touch_token", update(ApiToken.__table__).where(
    ApiToken.__table__.c.id == bindparam("token_id")).values(last_used_at=bindparam("now")))


def _principal(row) -> Principal:
    """The principal of a token row; 401 for none, a revoked or an expired one."""
    if row is None:
        raise Unauthorized("Unknown token.")
    if row.revoked_at is not None:
        raise Unauthorized(f"Token {row.prefix}… was revoked.")
    if row.expires_at <= utcnow():
        raise Unauthorized(f"Token {row.prefix}… expired at {row.expires_at:%Y-%m-%d %H:%M} UTC.")
    return Principal(user=row.user, role=Role(row.role), token_id=row.id)


def list_tokens(db: Database, *, user: str | None = None) -> list[TokenView]:
    """Tokens newest first, all of them or one user's."""
    with db.session_scope() as s:
        query = select(ApiToken).order_by(ApiToken.id.desc())
        if user is not None:
            query = query.where(ApiToken.user == user)
        return [to_view(TokenView, row) for row in s.scalars(query)]


def revoke_token(db: Database, token_id: int, actor: Principal) -> TokenView:
    """Revoke a token at once; an admin may revoke any, anyone else only their own."""
    with db.session_scope() as s:
        row = s.get(ApiToken, token_id) if 0 < token_id < 2**63 else None
        if row is None or not actor.may_act_for(row.user):
            raise NotFound(f"No token with id {token_id}.")  # others' tokens are not even confirmed to exist
        if row.revoked_at is not None:
            raise Conflict(f"Token {token_id} is already revoked.")
        row.revoked_at = utcnow()
        s.flush()
        return to_view(TokenView, row)


def bootstrap_admin_token(db: Database, path: Path, *, expires_in_days: int = 365) -> str | None:
    """Make sure `path` holds a working admin token; create one (and return its secret) when it does not."""
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        try:
            if authenticate(db, existing).role is Role.ADMIN:
                return None
        except Unauthorized:
            pass  # expired or revoked: issue a new one below
    _, secret = create_token(db, user=BOOTSTRAP_USER, role=Role.ADMIN, created_by="trainyard up",
                             name="bootstrap", expires_in_days=expires_in_days)
    write_secret_file(path, secret)
    return secret


def write_secret_file(path: Path, secret: str) -> None:
    """Write a secret readable by its owner only (0600), replacing the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (secret + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_or_create_secret(path: Path) -> str:
    """A long-lived random secret kept in `path` (0600): the web app's session-signing key.

    Several web processes may start at once; the first to link its file in place wins and every process
    then reads the winner's, so all of them sign sessions with the same key.
    """
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if value:
        return value
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_secret_file(tmp, secrets.token_urlsafe(48))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()
