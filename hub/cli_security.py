"""``outpost-hub keys ...``: the hub's signing keys, run on the hub's host (they read
the key ring folder and the database directly, and are audited as ``cli``).

Rotation without re-enrolling devices: ``keys rotate`` adds a key, announced
signed by the previous one (``hub.hubkeys``); running hub processes pick it
up within a second and publish the chain retained on ``outpost/v1/hub/keys``.
Retire the old key once every device has walked the chain (``keys list``
shows it; devices that were away longer still learn of the new key, as long
as the key they trust has not been retired).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime
from typing import Any

from shared.clock import SystemClock, utcnow

EPILOG = {
    "keys": "examples:\n  outpost-hub keys list\n  outpost-hub keys rotate\n  outpost-hub keys retire 3f2a9c0d11b2e4f5",
}


def add_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = command("keys", "The hub's signing keys: list, rotate (announced to devices signed by the old key), retire.")
    p.add_argument("action", choices=["list", "rotate", "retire"], help="list the ring; rotate: new signing key; retire KID: drop an old key")
    p.add_argument("kid", nargs="?", help="key id to retire")


def run(args: argparse.Namespace, settings: Any) -> int:
    return _keys(args, settings)


def _now() -> datetime:
    return utcnow(SystemClock())


def _audit(settings: Any, action: str, target: str, **detail: Any) -> None:
    from hub import audit
    from hub.db import make_engine, make_sessionmaker, transaction, upgrade

    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            audit.record(session, "cli", action, target, at=_now(), **detail)
    finally:
        engine.dispose()


def _keys(args: argparse.Namespace, settings: Any) -> int:
    from hub import hubkeys
    from hub.identity import HubKeyring

    folder = settings.key_ring_dir
    if args.action == "list":
        ring = HubKeyring.load_or_create(folder)
        retired = hubkeys.retired(folder)
        print(f"key ring {folder}")
        for key in ring.public_keys():
            state = "current" if key.kid == ring.current_kid else "active"
            print(f"{key.kid}  {state:8} {key.to_text()}")
        for kid in sorted(retired):
            print(f"{kid}  retired")
        return 0
    if args.action == "rotate":
        HubKeyring.load_or_create(folder)
        new, link = hubkeys.rotate(folder, SystemClock().now())
        _audit(settings, "hub_key.rotate", new.kid, previous=link.signer)
        print(f"new signing key {new.kid} ({new.public.to_text()}), announced signed by {link.signer}")
        print("running hub processes sign with it within a second; devices learn it from the retained announcement")
        return 0
    if not args.kid:
        print("outpost-hub keys retire: give the key id to retire (see outpost-hub keys list)")
        return 2
    link = hubkeys.retire(folder, args.kid, SystemClock().now()) if _retirable(folder, args.kid) else None
    if link is None:
        return 1
    _audit(settings, "hub_key.retire", args.kid, signer=link.signer)
    print(f"key {args.kid} retired (announced signed by {link.signer}); devices drop it when they read the announcement")
    return 0


def _retirable(folder: Any, kid: str) -> bool:
    from hub.identity import HubKeyring

    ring = HubKeyring.load(folder)
    if kid == ring.current_kid:
        print(f"outpost-hub: key {kid} is the current signing key; rotate first (outpost-hub keys rotate), then retire it")
        return False
    if kid not in ring.keys:
        print(f"outpost-hub: no key {kid} in {folder}; see outpost-hub keys list")
        return False
    return True

