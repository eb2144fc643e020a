"""The shapes of data: a reading's Arrow schema, the store's table schemas (a public contract),
validation of raw feed batches and the reason codes of refused rows.

Public API (what the rest of the repository imports), by module:
- `readings`: ALL_FIELDS, DEAD_LETTER_REASON, DEAD_LETTER_ROW, DEAD_LETTER_SOURCE, ENTITY_ID, EVENT_TIME, METRIC,
  READING_SCHEMA, REGION, REQUIRED_FIELDS, SENSOR_ID, VALUE
- `reasons`: FileReason, PUBLISHED_REASONS, RejectReason
- `tables`: AUDIT_SCHEMA, BUDGET_SCHEMA, DECISIONS_SCHEMA, FORECAST_SCORES_SCHEMA, FORECASTS_SCHEMA, MODELS_SCHEMA,
  RECOMMENDATIONS_SCHEMA, REJECTS_SCHEMA, RELEASES_SCHEMA, RUNS_SCHEMA, TABLE_SCHEMAS
- `validation`: checked_sql, connect, dead_letters, duckdb_input, ReadingRules, readings_as_dead_letters,
  ReadingValidator, register_rules, ROW_COLUMN, take_rows
"""
