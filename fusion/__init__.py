"""Fusion: privacy-preserving fusion of institutions' sensor feeds into a shared, queryable store.

Subpackages by concept, top floor first (a module imports its floor and those below, never above;
tests/test_layout.py): cli; api (the Python API), demo; trust (what readers may trust: the releases `fusion verify`
calls verified or legacy); store, keys; release, feeds; config; runtime, errors.

Public API (what the rest of the repository imports), by module:
- `api`: FusedStore, open_store, verify
- `trust`: unverified_releases, verify
- `errors`: ConfigError, FusionError, InternalError, ReleaseNotReady, ReleaseRefused, SqlError, SqlLimitExceeded,
  SqlRefused

Subpackages: cli, config, demo, feeds, keys, release, runtime, store
"""

import logging


class _BeamOptionalClientNotice(logging.Filter):
    """Drops the one warning Apache Beam logs at import when Google's BigQuery client library is not installed
    ("apitools not found ..."): Fusion uses no BigQuery, so it is noise on every command's and API user's
    stderr. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith("apitools not found, and bigquery client"))


logging.getLogger().addFilter(_BeamOptionalClientNotice())
