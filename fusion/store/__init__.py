"""The common-knowledge store: versioned Delta tables (`delta`), its privacy mode, the budget
ledger, scheduler runs, signed releases, and read access through sandboxed SQL (`access`,
re-exported by fusion.api).

Public API (what the rest of the repository imports), by module:
- `access`: DECISION_TABLES, DERIVED_TABLES, FusedStore, open_store, write_derived
- `delta`: Store
- `forecast_queries`: forecasts_query
- `ledger`: BudgetExceeded, BudgetLedger, Spend
- `mode`: bind_store_mode, releases_with_test_cells, store_mode
- `provenance`: ChainLink, next_link, ReleaseSignature, rows_digest, sign_release, SIGNATURE_FIELD
- `runs`: Claim, Outcome, RunLog
- `sql`: SqlSandbox
- `verification`: GOOD, ReleaseCheck, verify_releases
"""
