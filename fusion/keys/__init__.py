"""Who is who: the registry of the parties' public keys, and the key holder's HE and
release-signing keys.

Public API (what the rest of the repository imports), by module:
- `holder`: create_federation_keys, create_keys, load_checked_secret_context, load_public_context_bytes,
  load_registered_public_context_bytes, load_secret_context_bytes, published_context_digest,
  register_published_context
- `registry`: AGREEMENT_KEY, check_he_context, create_aggregator_key, create_institution_keys,
  create_key_holder_key, key_holder_signing_key_file, load_aggregator_public_key, load_aggregator_signing_key,
  load_agreement_key, load_agreement_keys, load_key_holder_public_keys, load_key_holder_signing_key,
  load_mechanism_sections, load_registry, load_signing_key, load_unsigned_releases, load_unsigned_rounds,
  read_private, register_he_context, register_unsigned_rounds, require_registry, write_mechanism_sections,
  write_private
"""
