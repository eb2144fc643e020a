"""One interval's release: its plan, the exchange where parties leave files, an institution's
contribution vector, and decoding the decrypted total into estimates, quantiles and reject
tallies; `planning` and `predictions` say what a release would cost and how noisy it would be.

Public API (what the rest of the repository imports), by module:
- `contribution`: cell_reading_counts, find_duplicates, pack_encoded, PartialAggregate
- `estimates`: decode_release, release_quantiles
- `exchange`: acknowledgement_path, aggregate_path, aggregation_status_path, contribution_path, contributions_dir,
  delete_if_exists, ENVELOPE_SUFFIX, EnvelopePlace, exists, FileTooLarge, join, list_files, public_context_path,
  public_context_sha256, read_bounded, read_bytes, refusal_path, ReleaseKey, remove_tree, roster_path, SECRET_CONTEXT,
  unmask_dir, unmask_path, write_bytes, write_json
- `plan`: masking_graph, parse_time, Period, period_of, plan_release, ReleasePlan
- `planning`: privacy_plan
- `predictions`: metric_noise, noise_table
- `quantiles`: histogram_quantiles, QUANTILES, Z95
- `rejects`: decode_reject_tallies, pack_reject_tallies, reject_tallies
"""
