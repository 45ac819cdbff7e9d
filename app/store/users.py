"""People and their sign-in sessions: tokens and session ids are stored only as SHA-256 hashes.

A token is 32 random bytes, so a plain hash (no salt, no slow KDF) is as strong as the token;
lookups go by the hash, and the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ConfigError, NotFoundError
from app.store.db import write_session
from app.store.tables import USER_ROLES, AuthSession, User, utcnow

TOKEN_PREFIX = "sst_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class UserInfo:
    id: int
    name: str
    role: str
    disabled: bool
    created_at: datetime


def _info(row: User) -> UserInfo:
    return UserInfo(id=row.id, name=row.name, role=row.role, disabled=row.disabled,
                    created_at=row.created_at)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_role(role: str) -> None:
    if role not in USER_ROLES:
        raise ConfigError(f"role: {role!r} is not one of {', '.join(USER_ROLES)}")


def add_user(engine: Engine, *, name: str, role: str) -> tuple[UserInfo, str]:
    """A new person and their token (shown once; only its hash is kept)."""
    if not _NAME_RE.match(name):
        raise ConfigError("name: 1-64 characters from letters, digits, '_', '.', '-'")
    check_role(role)
    token = new_token()
    try:
        with write_session(engine, durable=True) as session:
            user = User(name=name, role=role, token_hash=hash_secret(token), disabled=False,
                        created_at=utcnow())
            session.add(user)
            session.flush()
            info = _info(user)
    except IntegrityError:
        raise ConfigError(f"a user named {name!r} exists; `saescope user token {name}` gives "
                          "them a new token") from None
    return info, token


def ensure_first_admin(engine: Engine, *, name: str, token: str) -> bool:
    """Create admin `name` holding `token` if there are no users at all; True if created."""
    if len(token) < 32:
        raise ConfigError("SAESCOPE_ADMIN_TOKEN: at least 32 random characters")
    if not _NAME_RE.match(name):
        raise ConfigError("SAESCOPE_ADMIN_NAME: 1-64 characters from letters, digits, '_.-'")
    with write_session(engine, durable=True) as session:
        if session.scalar(select(User.id).limit(1)) is not None:
            return False
        session.add(User(name=name, role="admin", token_hash=hash_secret(token), disabled=False,
                         created_at=utcnow()))
    return True


def list_users(session: Session) -> list[UserInfo]:
    return [_info(u) for u in session.scalars(select(User).order_by(User.name))]


def set_disabled(engine: Engine, *, name: str, disabled: bool = True) -> None:
    """Disable (or enable) a person; disabling also ends their browser sessions."""
    with write_session(engine, durable=True) as session:
        user = session.scalars(select(User).where(User.name == name)).one_or_none()
        if user is None:
            raise NotFoundError(f"no user {name!r}; see `saescope user list`")
        user.disabled = disabled
        if disabled:
            session.execute(delete(AuthSession).where(AuthSession.user_id == user.id))


def reset_token(engine: Engine, *, name: str) -> str:
    """A new token for `name`; the old one stops working, and so do their sessions."""
    token = new_token()
    with write_session(engine, durable=True) as session:
        done = session.execute(update(User).where(User.name == name)
                               .values(token_hash=hash_secret(token)).returning(User.id)).first()
        if done is None:
            raise NotFoundError(f"no user {name!r}; see `saescope user list`")
        session.execute(delete(AuthSession).where(AuthSession.user_id == done.id))
    return token


def user_by_token(session: Session, token: str) -> UserInfo | None:
    """The enabled user holding this token, or None."""
    if not token or len(token) > 200:
        return None
    wanted = hash_secret(token)
    user = session.scalars(select(User).where(User.token_hash == wanted)).one_or_none()
    if user is None or user.disabled or not hmac.compare_digest(user.token_hash, wanted):
        return None
    return _info(user)


def start_session(engine: Engine, *, user_id: int, hours: int) -> tuple[str, datetime]:
    """A new browser session: (its id for the cookie, its expiry)."""
    session_id = secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(hours=hours)
    with write_session(engine) as session:
        session.execute(delete(AuthSession).where(AuthSession.expires_at < utcnow()))
        session.add(AuthSession(id_hash=hash_secret(session_id), user_id=user_id,
                                created_at=utcnow(), expires_at=expires))
    return session_id, expires


def user_by_session(session: Session, session_id: str) -> UserInfo | None:
    """The enabled user of an unexpired session, or None."""
    if not session_id or len(session_id) > 200:
        return None
    row = session.execute(
        select(User).join(AuthSession, AuthSession.user_id == User.id)
        .where(AuthSession.id_hash == hash_secret(session_id),
               AuthSession.expires_at > utcnow())
    ).scalar_one_or_none()
    if row is None or row.disabled:
        return None
    return _info(row)


def end_session(engine: Engine, session_id: str) -> None:
    with write_session(engine) as session:
        session.execute(delete(AuthSession).where(
            AuthSession.id_hash == hash_secret(session_id)))
