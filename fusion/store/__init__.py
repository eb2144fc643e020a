"""The common-knowledge store: versioned Delta tables (`delta`), its privacy mode, the budget
ledger, scheduler runs, signed releases, and read access through sandboxed SQL (`access`,
re-exported by fusion.api).

Public API (what the rest of the repository imports), by module:
- `access`: DECISION_TABLES, DERIVED_TABLES, FusedStore, open_store, write_derived
- `charge_record`: CHARGE_RECORD_DIR, ChargeRecord (the key holder's own record of its budget rows)
- `delta`: Store
- `failures`: check_writable, read_failure, store_failure, store_failures, StoreUnavailable
- `forecast_queries`: forecasts_query
- `ledger`: BudgetExceeded, BudgetLedger, recorded_charges, RestoredRow, Spend
- `mode`: bind_store_mode, releases_with_test_cells, store_mode
- `provenance`: ChainLink, next_link, ReleaseSignature, rows_digest, sign_release, SIGNATURE_FIELD, store_id
- `runs`: Claim, Outcome, RunLog
- `signed_budget`: budget_claim, budget_checks, BudgetClaim, parse_budget_claim, PeriodFinding
- `sql`: SqlSandbox
- `verification`: GOOD, ReleaseCheck, verify_releases
"""
