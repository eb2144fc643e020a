"""The privacy primitives, independent of Fusion's config and store: Skellam and Gaussian noise and
its shares, accounting (PLD, RDP), bounding, fixed-point encoding and the packed layout, masking,
secret sharing, BFV (TenSEAL) envelopes and signatures. Pure functions, no Beam.

Public API (what the rest of the repository imports), by module:
- `accountant`: calibrate_skellam_variance, calibrate_variance, Composition, epsilon_for, epsilon_from_rdp,
  mechanism_rdp, NormBoundMechanism, ORDERS, period_loss, PeriodLoss, ReleaseCharge, skellam_epsilon
- `bounding`: bound_contributions
- `encoding`: balanced_encodings, bin_index, encode_readings, encode_squares, entity_level_sensitivity,
  event_level_sensitivity, MetricEncoding, Sensitivity
- `envelope`: envelope_header, EnvelopeError, EnvelopeHeader, pack_envelope, PayloadMismatch, signature_valid,
  unpack_envelope
- `gaussian`: analytic_gaussian_sigma
- `he`: add_encrypted, add_plain, check_ciphertext, check_no_wrap, ciphertexts_for, decrypt_vector, encrypt_vector,
  generate_keys, load_public_context, load_secret_context, MAX_ABS_TOTAL, PLAIN_MODULUS, WrapRisk
- `layout`: BASE_COMPONENTS, bin_components, PartitionLayout, SUMSQ
- `masking`: add_mod, agreement, centred, generate_agreement_key, mask_vector, pair_key, pair_term, pairwise_mask
- `masking_graph`: dropout_failure_bound, MaskingGraph, neighbour_count
- `noise_shares`: chain_seeds, layer_commitment, layer_noise, noise_digest, NoiseLayers, roster_signatures_needed,
  SEED_BYTES, unknown_shares
- `pld`: pld_epsilon, resolves, SkellamMechanism
- `sharing`: commitment, decode_share, encode_share, new_seed, open_share, pair_entry, pair_key_context,
  reconstruct, self_mask, share_coordinates, share_digest, share_pair_keys, share_seed, ShareError
- `signing`: generate_signing_key, public_key, sign, verify
- `skellam`: MAX_POISSON_RATE, secure_generator, seeded_generator, SkellamNoise
"""
