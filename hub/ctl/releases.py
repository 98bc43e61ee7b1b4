"""``outpost release keygen|sign|verify``: release keys and signed manifests,
made where the release key lives (a build server, a release manager's
machine), never on the hub. These commands talk to no hub (docs/fleet.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from hub.ctl.errors import CtlError, ExitCode
from hub.ctl.http import HubClient
from hub.ctl.parsing import add_command, add_noun
from shared.clock import SystemClock
from shared.release import Manifest, ManifestError, load, sign
from shared.signing import BadKey, PublicKey, SignatureError, SigningKey

_READ_CHUNK = 1024 * 1024


def register(nouns: Any) -> None:
    verbs = add_noun(nouns, "release", "Make release keys and sign firmware manifests (offline: no hub involved).",
                     ["outpost release keygen --out release.key", "outpost release sign --key release.key --image fw.bin --name sensor-fw --version 2.1.0 --out fw.manifest.json"])

    cmd = add_command(verbs, "keygen", "Create a release key (Ed25519, file mode 0600) and print its public key for devices and the hub.", keygen,
                      ["outpost release keygen --out release.key"])
    cmd.add_argument("--out", required=True, metavar="PATH", help="the private key file to write (refuses to overwrite one)")

    cmd = add_command(verbs, "sign", "Sign a release manifest for a firmware image (size and SHA-256 computed from the file).", sign_release,
                      ["outpost release sign --key release.key --image fw.bin --name sensor-fw --version 2.1.0 --out fw.manifest.json",
                       "outpost release sign --key release.key --image fw.bin --name sensor-fw --version 2.0.9 --security-version 3 --allow-downgrade --hardware rpi4 --out fw.manifest.json"])
    cmd.add_argument("--key", required=True, action="append", metavar="PATH", help="release key file; repeat to sign with several (key rotation)")
    cmd.add_argument("--image", required=True, metavar="PATH", help="the firmware image")
    cmd.add_argument("--name", required=True, help="product line, e.g. sensor-fw")
    cmd.add_argument("--version", required=True, help="dotted version, e.g. 2.1.0")
    cmd.add_argument("--security-version", type=int, default=0, metavar="N", help="anti-rollback counter (default 0): devices never install an image below the highest they committed")
    cmd.add_argument("--hardware", nargs="+", action="extend", default=[], metavar="MODEL", help="hardware models the image fits (default: any)")
    cmd.add_argument("--allow-downgrade", action="store_true", help="let devices on a higher version install this one (same or higher security version only)")
    cmd.add_argument("--notes", default="", help="release notes, signed with the rest")
    cmd.add_argument("--out", required=True, metavar="PATH", help="where to write the signed manifest (JSON)")

    cmd = add_command(verbs, "verify", "Check a signed manifest against release public keys (and, with --image, the image against it).", verify,
                      ["outpost release verify --pubkey ed25519:Ab3... fw.manifest.json", "outpost release verify --pubkey ed25519:Ab3... --image fw.bin fw.manifest.json"])
    cmd.add_argument("manifest", metavar="MANIFEST", help="signed manifest file")
    cmd.add_argument("--pubkey", required=True, action="append", metavar="ed25519:...", help="a trusted release public key; repeat for several")
    cmd.add_argument("--image", metavar="PATH", help="also check this image's size and SHA-256")


def keygen(client: HubClient, args: argparse.Namespace) -> None:
    path = Path(args.out)
    if path.exists():
        raise CtlError(f"{path} exists; a release key is never overwritten (devices trust it): choose another --out", ExitCode.USAGE)
    key = SigningKey.generate()
    try:
        key.save(path)
    except OSError as exc:
        raise CtlError(f"cannot write {path}: {exc.strerror}", ExitCode.USAGE) from None
    print(key.public.to_text())
    print(f"wrote {path} (mode 0600, key id {key.kid}); keep it offline, give devices and the hub's release_public_keys the public key above", file=sys.stderr)


def digest(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read in chunks."""
    hasher, size = hashlib.sha256(), 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_READ_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise CtlError(f"cannot read {path}: {exc.strerror}", ExitCode.USAGE) from None
    return size, hasher.hexdigest()


def _key(path: str) -> SigningKey:
    try:
        return SigningKey.load(Path(path))
    except BadKey as exc:
        raise CtlError(str(exc), ExitCode.USAGE) from None


def sign_release(client: HubClient, args: argparse.Namespace) -> None:
    keys = [_key(p) for p in args.key]
    size, sha256 = digest(Path(args.image))
    try:
        manifest = Manifest(
            name=args.name, version=args.version, size=size, sha256=sha256, security_version=args.security_version,
            hardware=tuple(args.hardware), allow_downgrade=args.allow_downgrade, created_at=round(SystemClock().now(), 3), notes=args.notes,
        )
    except ManifestError as exc:
        raise CtlError(str(exc), ExitCode.USAGE) from None
    out = Path(args.out)
    try:
        out.write_bytes(sign(manifest, *keys).to_bytes())
    except OSError as exc:
        raise CtlError(f"cannot write {out}: {exc.strerror}", ExitCode.USAGE) from None
    print(f"signed {manifest.artifact_id} ({size} bytes, sha256 {sha256}) with key(s) {', '.join(k.kid for k in keys)}: {out}")


def verify(client: HubClient, args: argparse.Namespace) -> int:
    try:
        trusted = [PublicKey.from_text(text) for text in args.pubkey]
        signed = load(Path(args.manifest).read_bytes())
    except (BadKey, ManifestError) as exc:
        raise CtlError(str(exc), ExitCode.USAGE) from None
    except OSError as exc:
        raise CtlError(f"cannot read {args.manifest}: {exc.strerror}", ExitCode.USAGE) from None
    manifest = signed.manifest
    try:
        key = signed.verify(trusted)
    except SignatureError as exc:
        print(f"NOT VERIFIED: {exc} ({exc.code})")
        return ExitCode.RUN_FAILED
    if args.image:
        size, sha256 = digest(Path(args.image))
        if (size, sha256) != (manifest.size, manifest.sha256):
            print(f"NOT VERIFIED: {args.image} is {size} bytes, sha256 {sha256}; the manifest says {manifest.size} bytes, sha256 {manifest.sha256}")
            return ExitCode.RUN_FAILED
    print(json.dumps({"verified": True, "artifact_id": manifest.artifact_id, "key": key.kid, **manifest.to_dict()}, indent=2))
    return ExitCode.OK
