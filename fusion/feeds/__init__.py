"""An institution's feeds: reading feed files, scanning them into validated, encoded scan
shards, the report of what was refused, and a stream's durable progress.

Public API (what the rest of the repository imports), by module:
- `files`: absent_columns, AmbiguousColumns, feed_listing, mapped_columns, RawBatch, read_feed_file,
  read_jsonl_lines, refuse_duplicate_columns
- `report`: FileTally, judge_rejects, merge_tallies, RejectLevel, worst_files
- `scan`: BIN, CELL, encode_scanned, ENTITY, FeedScanner, KEY, list_sources, malformed_letters, ROW,
  scan_connection, scan_shards, ShardScan, SOURCE, staged_sources, SUM
- `stream_state`: add_counts, adopt_grid, backlog, due_windows, InputStamp, load_state, release_bound, save_state,
  StateLock, StreamState, window_start, WINDOWED_REASONS, WindowStatus
"""
