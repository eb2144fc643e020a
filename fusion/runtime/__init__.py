"""Processes and time: durations on the epoch grid, batch schedules, the process behind a
scheduler claim, crash points for the crash-safety tests, and leaving a process fast.

Public API (what the rest of the repository imports), by module:
- `durations`: EPOCH, floor_to_grid, parse_duration
- `faults`: crash_point
- `runner_process`: RunnerProcess
- `schedule`: Action, Attempt, check_schedules, decide, due_intervals, grid, Interval, latest_fire, next_fire,
  RunStatus, ScheduleConfig
- `shutdown`: exit_now
"""
