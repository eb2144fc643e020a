"""The `fusion` command line, one module per command group: `core` holds the parser, `main` and `run` (the
console script); `release` the release commands, `stream`, `inspection` (plan, budget, verify, sql), `keys`,
`demo` and the others theirs; `output` the consoles and `print_arrow`, `options` the shared options.
`python -m fusion.cli` runs it.

Public API (what the rest of the repository imports), by module:
- `core`: main, run
- `demo`: add_parsers, cmd_demo, DEMO_TRY_QUERY
- `demo_steps`: dispatch_step, forecast_step, release_history
- `forecast`: add_parsers, cmd_backtest, cmd_forecast
- `formats`: cell_text, visible, write_csv, write_json_lines
- `inspection`: add_parsers, cmd_budget, cmd_plan, cmd_sql, cmd_verify
- `keys`: add_parsers, cmd_keys
- `mechanisms`: add_parsers, COMMANDS, run_command, show_recommendation, verify_mechanisms_tables
- `options`: non_negative, with_config, with_interval
- `output`: console, err_console, print_arrow
- `release`: add_parsers, cmd_aggregate, cmd_batch, cmd_contribute, cmd_prune_exchange, cmd_release
- `schedule`: add_parsers, cmd_backfill, cmd_schedule
- `serve`: add_parsers, cmd_serve
- `stream`: add_parsers, cmd_stream
- `train`: add_parsers, cmd_train
"""
