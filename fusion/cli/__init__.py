"""The `fusion` command line, one module per command group: `core` holds the parser, `run` (the
console script) and the release commands; `python -m fusion.cli` runs it.

Public API (what the rest of the repository imports), by module:
- `core`: console, err_console, print_arrow, run
- `demo_steps`: forecast_step, release_history
- `forecast`: add_parsers, cmd_backtest, cmd_forecast
- `formats`: cell_text, write_csv, write_json_lines
- `mechanisms`: add_parsers, COMMANDS, demo_step, run_command, verify_mechanisms_tables
- `schedule`: add_parsers, cmd_backfill, cmd_schedule
- `serve`: add_parsers, cmd_serve
- `train`: add_parsers, cmd_train
"""
