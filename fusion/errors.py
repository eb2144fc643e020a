"""Project errors: user mistakes are ValueErrors that say what to fix; broken invariants are internal errors."""

from __future__ import annotations


class FusionError(ValueError):
    """A user-facing error: bad config, bad arguments, refused operation. The message says how to fix it.

    `public`: what may be written where every reader of the shared store sees it (the scheduler's `runs` table),
    when the message itself quotes an institution's data (exact reject counts and rates, a cell's readings),
    which stay with that institution and its operator: `shared_message` gives it, or the message when None."""

    def __init__(self, *args: object, public: str | None = None) -> None:
        super().__init__(*args)
        self.public = public  # kept in __dict__: it survives pickling with the message


def shared_message(exc: BaseException) -> str:
    """What a shared table may record of `exc`: a Fusion error's `public` text (its message when it has none); of
    any other error only its type, since its message may quote a reading (a value that failed to parse) or a
    count, and stays in the local log."""
    if isinstance(exc, FusionError):
        return exc.public if exc.public is not None else str(exc)
    return f"{type(exc).__name__} (its message is in this runner's log: it may quote an institution's data)"


class ConfigError(FusionError):
    """The federation config is invalid; the message names the field."""


class SqlRefused(FusionError):
    """A SQL query tried something the read-only sandbox does not allow."""


class SqlError(FusionError):
    """A SQL query failed (syntax, unknown column...)."""


class StoreUnreadable(SqlError):
    """The store's files could not be read: a data file damaged, missing, or rewritten outside Delta. Not the
    query's fault, nor a bug: `fusion verify` says whether the releases are still what was published."""


class SqlLimitExceeded(SqlError):
    """A SQL query ran past its time limit, or its result past its row or size limit (fusion/config/sql_limits.py)."""


class NoReleaseSigningKey(FusionError):
    """No key holder release-signing key is registered: no release can be verified (`fusion.api.verify`)."""


class ReleaseRefused(FusionError):
    """A release cannot go ahead (quorum not met, nothing to release, already released)."""


class ReleaseNotReady(ReleaseRefused):
    """Nothing to release yet: the aggregator has neither aggregated nor refused the interval (`fusion release`
    exits 3, "run me again")."""


class InternalError(RuntimeError):
    """An invariant Fusion relies on was broken: this is probably a bug; please report it."""
