"""Project errors: user mistakes are ValueErrors that say what to fix; broken invariants are internal errors."""

from __future__ import annotations


class FusionError(ValueError):
    """A user-facing error: bad config, bad arguments, refused operation. The message says how to fix it."""


class ConfigError(FusionError):
    """The federation config is invalid; the message names the field."""


class SqlRefused(FusionError):
    """A SQL query tried something the read-only sandbox does not allow."""


class SqlError(FusionError):
    """A SQL query failed (syntax, unknown column...)."""


class SqlLimitExceeded(SqlError):
    """A SQL query ran past its time limit, or its result past its row or size limit (fusion/config/sql_limits.py)."""


class ReleaseRefused(FusionError):
    """A release cannot go ahead (quorum not met, nothing to release, already released)."""


class ReleaseNotReady(ReleaseRefused):
    """Nothing to release yet: the aggregator has neither aggregated nor refused the interval (`fusion release`
    exits 3, "run me again")."""


class InternalError(RuntimeError):
    """An invariant Fusion relies on was broken: this is probably a bug; please report it."""
