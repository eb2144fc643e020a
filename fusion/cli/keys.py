"""`fusion keys`: the key holder's HE keys and release-signing key, an institution's signing and key-agreement
keys, the aggregator's signing key; each created (or rotated) and registered."""

from __future__ import annotations

import argparse

from fusion.cli.options import with_config
from fusion.cli.output import console
from fusion.config.federation import load_config


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = with_config(sub.add_parser("keys", help="key holder: create the HE keys; an institution: --institution ID"))
    keys.add_argument("--institution", help="create this institution's signing key and register it")
    keys.add_argument("--aggregator", action="store_true", help="create the aggregator's signing key, register it")
    keys.add_argument(
        "--release-signing",
        action="store_true",
        help="key holder: create (or with --overwrite rotate) only the release-signing key, and register it",
    )
    keys.add_argument(
        "--register-context",
        action="store_true",
        help="key holder: record the published public HE context's SHA-256 in the registry (a registry written "
        "before it held one), which institutions and the aggregator check the exchange's copy against",
    )
    keys.add_argument(
        "--register-unsigned-rounds",
        action="store_true",
        help="key holder, once after upgrading: register the store's training rounds whose audit record holds no "
        "signature (committed before Fusion signed rounds), which `fusion verify` then reports legacy",
    )
    keys.add_argument("--overwrite", action="store_true", help="replace existing keys")


def cmd_keys(args: argparse.Namespace) -> int:
    from fusion.keys.registry import create_institution_keys

    config = load_config(args.config, check_release=False)  # creating keys needs no noise calibration
    if args.aggregator:
        from fusion.keys.registry import create_aggregator_key

        key_file = create_aggregator_key(config, overwrite=args.overwrite)
        console.print(f"aggregator's signing key (mode 0600): {key_file}\nregistered in {config.registry_path}")
        return 0
    if args.release_signing:
        from fusion.keys.registry import create_key_holder_key, load_key_holder_public_keys, load_unsigned_releases
        from fusion.store.delta import Store

        published = Store(config.store_path).release_ids()
        replaced = bool(load_key_holder_public_keys(config))
        key_file = create_key_holder_key(config, published=published, overwrite=args.overwrite)
        note = (
            "the replaced key stays registered as retired, so the releases it signed still verify"
            if replaced
            else f"{len(load_unsigned_releases(config))} release(s) published before it registered as unsigned"
        )
        console.print(
            f"key holder's release-signing key (mode 0600): {key_file}\nregistered in {config.registry_path} ({note})"
        )
        return 0
    if args.register_context:
        from fusion.keys.holder import register_published_context

        digest = register_published_context(config)
        console.print(f"public HE context (SHA-256 {digest}) registered in {config.registry_path}; share the registry")
        return 0
    if args.register_unsigned_rounds:
        from fusion.keys.registry import register_unsigned_rounds
        from fusion.store.delta import Store
        from fusion.store.verification import unsigned_rounds

        added = register_unsigned_rounds(config, unsigned_rounds(Store(config.store_path)))
        console.print(
            f"{len(added)} training round(s) without a signature registered as unsigned in {config.registry_path}"
            + (f": {', '.join(added)}" if added else "")
        )
        return 0
    if args.institution:
        from fusion.keys.registry import AGREEMENT_KEY

        key_file = create_institution_keys(config, args.institution, overwrite=args.overwrite)
        console.print(
            f"signing key of {args.institution} (mode 0600): {key_file}\n"
            f"key-agreement key for pairwise masks (mode 0600): {key_file.parent / AGREEMENT_KEY}\n"
            f"public halves registered in {config.registry_path}"
        )
        return 0
    from fusion.keys.holder import create_keys  # TenSEAL: only the key holder's HE keys need it
    from fusion.keys.registry import key_holder_signing_key_file

    had_signing_key = key_holder_signing_key_file(config).exists()
    secret, public = create_keys(config, overwrite=args.overwrite)
    kept = "kept: releases stay verifiable" if had_signing_key else f"new, registered in {config.registry_path}"
    console.print(
        f"secret context (key holder only, mode 0600): {secret}\npublic context: {public}\n"
        f"its SHA-256 registered in {config.registry_path} (share the registry)\n"
        f"release-signing key (mode 0600, {kept}): {key_holder_signing_key_file(config)}"
    )
    return 0
