"""Domain errors shared by every layer; the API and the CLI each render them in one shape."""

from __future__ import annotations


class SaescopeError(Exception):
    """Base for errors a user can act on: the message says what went wrong and how to fix it."""

    status_code = 400


class ConfigError(SaescopeError):
    """Bad user input: an unknown preset, hook name, SAE file, corpus or option value."""

    status_code = 422


class NotFoundError(SaescopeError):
    """Something asked for by id does not exist."""

    status_code = 404


class OfflineError(SaescopeError):
    """Something would need a network download, and this machine is offline."""

    status_code = 422


class BusyError(SaescopeError):
    """The model queue is full; the client should retry after `retry_after` seconds."""

    status_code = 503

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyRequestsError(SaescopeError):
    """This person already runs as many model jobs as they may; retry after `retry_after` s."""

    status_code = 429

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConflictError(SaescopeError):
    """A write lost a race (e.g. a label edited meanwhile): reload and apply the change again."""

    status_code = 409


class UnavailableError(SaescopeError):
    """A service this request needs is not running (no model loaded, or still loading)."""

    status_code = 503

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnauthorizedError(SaescopeError):
    """No valid credentials: sign in, or send `Authorization: Bearer <token>`."""

    status_code = 401


class ForbiddenError(SaescopeError):
    """Signed in, but this role may not do that (or the request came from another site)."""

    status_code = 403


class PreconditionFailedError(SaescopeError):
    """A write based on a stale version (If-Match), or a create where one exists (If-None-Match)."""

    status_code = 412


class PreconditionRequiredError(SaescopeError):
    """A write to an existing label without If-Match: the server cannot tell it is not stale."""

    status_code = 428


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the work saved what it could: the message says what and how it resumes."""
