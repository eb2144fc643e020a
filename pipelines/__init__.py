"""Beam wiring of Fusion's roles (an institution's contribution, the aggregator, the unmask round, the
key holder's release), run as one batch, in process, on a schedule or as a stream.

Public API (what the rest of the repository imports), by module:
- `aggregate`: Aggregate, EncryptedSum, envelope_paths, OnePerInstitution, OpenEnvelope, PublicContext, REFUSED,
  SealAggregate
- `aggregate_envelope`: AGGREGATE_MISMATCH, AGGREGATE_UNVERIFIABLE, aggregate_header, AggregateProblem,
  contributions_sum, recompute_problem, total, unmasked_sum
- `batch`: audit_feeds, run_batch
- `broker_journal`: AckFloor, JOURNAL_SUFFIX, message_lines, SourceJournal
- `broker_sources`: SourceReader, start_readers
- `contribute`: Contribute, ContributeShard, DEAD, dead_letter_dir, double_mask, FILES, masking_graph,
  MergeFileTallies, MergePartials, PARTIAL, remove_staging, scan_work, SealContribution, StageFeed,
  staging_prefix, WriteDeadLetters
- `envelope_checks`: EnvelopeChecks, misnamed, one_per_institution, Opened, PublicContext
- `local`: aggregate_locally, contribute_locally, run_dofn
- `release`: audit_event, audit_row, prepare_releases, PreparedRelease, publish_releases, release, ReleaseOutcome
- `run`: beam_options, beam_scratch, names_runner, run_aggregate, run_contributions, run_unmask
- `scheduler`: backfill, check_backfill_end, RunResult, Scheduler, utc_now
- `sealing`: charge_doc, contributions_lock, forget_layer_seed, KEEP_SEALED, kept_charge, noise_generator,
  record_sealed, refuse_overlap, refuse_past_cap, round_charges, round_records, round_records_dir, sealed_charges,
  sealed_envelope, sealed_layer_seed, seal_noise_layers
- `stream`: DEAD, LATE, REJECTS, RejectWindows, run_micro_batch, run_micro_batch_in_process, spool_dir, spool_key,
  SPOOL_WINDOW_FORMAT, SpoolWindow, StampWindows, stdin_feed, stream_rules, validated_outputs, WindowReadings,
  WriteDeadLetter
- `stream_driver`: StreamDriver, StreamStatus
- `stream_release`: release_windows
- `stream_sources`: MARKERS, REJECT_COUNTS, run_unbounded
- `unmask`: absent_mask_sum, absent_mask_total, acknowledge, acknowledged, acknowledgements_needed, Answer,
  opened_shares, read_roster, removable_noise, RemovedLayers, removed_masks, revealed_layers, Roster, seal_unmask,
  self_mask_sum, self_mask_total, sparse_roster_problem, write_roster
"""
