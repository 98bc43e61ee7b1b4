"""Signed release manifests: what a firmware image is, vouched for by a release key.

A release key is an Ed25519 key held offline by whoever releases firmware
(a build server, a person with a hardware token), never by the hub: the hub's
online assignment key can tell a device *to* update, but only a manifest
signed by a release key the device trusts can tell it *what* to install. A
compromised hub can therefore stall a rollout or replay an old *released*
image (which anti-rollback refuses), but never install an image nobody
released.

The signed document is JSON::

    {"manifest": {...fields of Manifest...},
     "signatures": [{"kid": "<release key id>", "sig": "<base64url>"}]}

Each signature covers the manifest's canonical JSON (sorted keys, no
whitespace, UTF-8) under the purpose ``release-manifest``. More than one
signature lets a release be signed by the old and the new key while devices
move from one to the other; a verifier needs one from a key it trusts.

Versions compare as dotted integers (``2.10.0`` > ``2.9.3``; a suffix after
``-`` or ``+`` is kept in the text but not compared). ``security_version``
is the anti-rollback counter: a device never installs an image whose
counter is below the highest it has committed, whatever ``allow_downgrade``
says (that flag only allows a lower *version* at the same or a higher
counter, to back out a bad feature release without reopening a fixed hole).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.errors import OutpostError
from shared.signing import PublicKey, SignatureError, SigningKey, decode_signature, encode_signature

PURPOSE = "release-manifest"
#: A manifest is small; anything bigger is not one.
MAX_DOCUMENT_BYTES = 64 * 1024
_VERSION_RE = re.compile(r"^(\d+)(\.\d+){0,3}([-+][0-9A-Za-z.+-]*)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(OutpostError):
    """A manifest document is malformed, or its fields are invalid."""

    code = "bad_manifest"


def parse_version(text: str) -> tuple[int, ...]:
    """``"2.10.1-rc1"`` -> ``(2, 10, 1)``; raises ``ManifestError`` for a non-version."""
    if not isinstance(text, str) or not _VERSION_RE.match(text):
        raise ManifestError(f"version {text!r} is not a dotted version like 2.1.0")
    core = re.split(r"[-+]", text, maxsplit=1)[0]
    parts = tuple(int(p) for p in core.split("."))
    return parts + (0,) * (4 - len(parts))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is below, equal to or above ``b``."""
    pa, pb = parse_version(a), parse_version(b)
    return (pa > pb) - (pa < pb)


@dataclass(frozen=True)
class Manifest:
    """One firmware release. ``name`` is the product line (``sensor-fw``);
    ``hardware`` lists the hardware models it may be installed on (empty: any)."""

    name: str
    version: str
    size: int
    sha256: str
    security_version: int = 0
    hardware: tuple[str, ...] = ()
    allow_downgrade: bool = False
    created_at: float = 0.0
    notes: str = ""
    #: Free-form, signed along with the rest (build id, changelog URL...).
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ManifestError(f"manifest name {self.name!r} must be 1-100 characters of letters, digits, '.', '_' or '-'")
        parse_version(self.version)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ManifestError(f"manifest size must be a positive integer, got {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA256_RE.match(self.sha256):
            raise ManifestError("manifest sha256 must be 64 lowercase hex digits")
        if isinstance(self.security_version, bool) or not isinstance(self.security_version, int) or self.security_version < 0:
            raise ManifestError(f"manifest security_version must be an integer >= 0, got {self.security_version!r}")
        if not isinstance(self.hardware, tuple) or not all(isinstance(h, str) and h for h in self.hardware):
            raise ManifestError("manifest hardware must be a list of non-empty strings")
        if not isinstance(self.allow_downgrade, bool):
            raise ManifestError("manifest allow_downgrade must be true or false")
        if not isinstance(self.notes, str) or not isinstance(self.extra, Mapping):
            raise ManifestError("manifest notes must be a string and extra an object")

    @property
    def artifact_id(self) -> str:
        """The artifact store's id for this release: ``<name>-<version>``."""
        return f"{self.name}-{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hardware"] = list(self.hardware)
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError("manifest must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"manifest has unknown field(s) {unknown}")
        missing = sorted({"name", "version", "size", "sha256"} - set(data))
        if missing:
            raise ManifestError(f"manifest lacks field(s) {missing}")
        hardware = data.get("hardware", [])
        if not isinstance(hardware, list):
            raise ManifestError("manifest hardware must be a list of strings")
        created = data.get("created_at", 0.0)
        if isinstance(created, bool) or not isinstance(created, int | float):
            raise ManifestError("manifest created_at must be a number")
        return cls(**{**data, "hardware": tuple(hardware), "created_at": float(created), "extra": dict(data.get("extra") or {})})

    def canonical(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def fits(self, hardware_model: str) -> bool:
        return not self.hardware or hardware_model in self.hardware


@dataclass(frozen=True)
class SignedManifest:
    manifest: Manifest
    #: (key id, signature) pairs, in document order.
    signatures: tuple[tuple[str, bytes], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": self.manifest.to_dict(), "signatures": [{"kid": kid, "sig": encode_signature(sig)} for kid, sig in self.signatures]}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2).encode() + b"\n"

    def verify(self, trusted: Iterable[PublicKey]) -> PublicKey:
        """The trusted release key that signed this manifest; raises
        ``SignatureError`` (code ``unknown_release_key`` or ``bad_signature``)
        when none did."""
        keys = {key.kid: key for key in trusted}
        if not keys:
            raise SignatureError("no release key is trusted on this device, so no firmware can be verified", code="unknown_release_key")
        data = self.manifest.canonical()
        known = [(kid, sig) for kid, sig in self.signatures if kid in keys]
        if not known:
            kids = ", ".join(kid for kid, _ in self.signatures) or "none"
            raise SignatureError(f"manifest is signed by release key(s) {kids}, none of them trusted", code="unknown_release_key")
        for kid, sig in known:
            try:
                keys[kid].verify(PURPOSE, data, sig)
                return keys[kid]
            except SignatureError:
                continue
        raise SignatureError(f"manifest signature by release key {known[0][0]} does not verify: the manifest was altered or the signature forged")


def sign(manifest: Manifest, *keys: SigningKey) -> SignedManifest:
    if not keys:
        raise ValueError("sign() needs at least one release key")
    data = manifest.canonical()
    return SignedManifest(manifest, tuple((key.kid, key.sign(PURPOSE, data)) for key in keys))


def load(document: bytes | str | Mapping[str, Any]) -> SignedManifest:
    """Parse a signed manifest document (bytes, text or the decoded object);
    raises ``ManifestError``. Does not verify: call :meth:`SignedManifest.verify`."""
    if isinstance(document, bytes | str):
        if len(document) > MAX_DOCUMENT_BYTES:
            raise ManifestError(f"manifest document is {len(document)} bytes, over the {MAX_DOCUMENT_BYTES} limit")
        try:
            data = json.loads(document)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest document is not JSON: {exc}") from None
    else:
        data = dict(document)
    if not isinstance(data, dict) or set(data) != {"manifest", "signatures"}:
        raise ManifestError("a signed manifest is an object with exactly 'manifest' and 'signatures'")
    sigs = data["signatures"]
    if not isinstance(sigs, list) or not sigs:
        raise ManifestError("a signed manifest needs at least one signature")
    pairs = []
    for item in sigs:
        if not isinstance(item, dict) or not isinstance(item.get("kid"), str) or not isinstance(item.get("sig"), str):
            raise ManifestError("each signature is an object with string 'kid' and 'sig'")
        try:
            pairs.append((item["kid"], decode_signature(item["sig"])))
        except SignatureError as exc:
            raise ManifestError(f"signature by {item['kid']}: {exc}") from None
    return SignedManifest(Manifest.from_dict(data["manifest"]), tuple(pairs))
