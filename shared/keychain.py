"""The hub's key announcement chain: how devices learn new hub keys.

The hub signs everything it sends with its *current* key. Rotating adds a
key and an ``add`` link naming it, signed by the key that was current
before; retiring a key adds a ``retire`` link signed by the current key.
The whole chain travels in one signed :class:`~shared.messages.KeyAnnouncement`
(retained on ``outpost/v1/hub/keys``), so a device that was offline across
several rotations walks A -> B -> C from whichever key it still trusts.

:func:`walk` applies a chain to a trusted set: a link counts only when its
signer is trusted (at that point of the walk) and its signature verifies
(purpose ``key-announce``); a retired key id is never trusted again, so an
old chain replayed cannot bring it back. A key never retires itself, so
the walk never leaves a device with no key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from shared.messages import KeyLink
from shared.signing import BadKey, PublicKey, SignatureError, SigningKey, decode_signature, encode_signature

PURPOSE = "key-announce"


def link_bytes(action: str, kid: str, key: str, signer: str, at: float) -> bytes:
    """What a link's signature covers (canonical JSON, the signature left out)."""
    return json.dumps({"action": action, "at": at, "key": key, "kid": kid, "signer": signer}, sort_keys=True, separators=(",", ":")).encode()


def make_add(new: PublicKey, signer: SigningKey, at: float) -> KeyLink:
    data = link_bytes("add", new.kid, new.to_text(), signer.kid, at)
    return KeyLink("add", new.kid, signer.kid, at, encode_signature(signer.sign(PURPOSE, data)), new.to_text())


def make_retire(kid: str, signer: SigningKey, at: float) -> KeyLink:
    if kid == signer.kid:
        raise ValueError("a key cannot retire itself; make another key current first")
    data = link_bytes("retire", kid, "", signer.kid, at)
    return KeyLink("retire", kid, signer.kid, at, encode_signature(signer.sign(PURPOSE, data)))


@dataclass
class Walk:
    trusted: dict[str, PublicKey]
    retired: set[str]
    added: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.dropped)


def walk(links: Iterable[KeyLink], trusted: Mapping[str, PublicKey], retired: Iterable[str] = ()) -> Walk:
    """Apply ``links`` to ``trusted``; returns the new trusted set and what changed."""
    out = Walk(dict(trusted), set(retired))
    for kid in out.retired:
        out.trusted.pop(kid, None)
    pending = list(links)
    progress = True
    while progress and pending:
        progress = False
        for link in list(pending):
            signer = out.trusted.get(link.signer)
            if signer is None:
                continue  # perhaps added by a later link: another round
            pending.remove(link)
            progress = True
            try:
                signer.verify(PURPOSE, link_bytes(link.action, link.kid, link.key, link.signer, link.at), decode_signature(link.sig))
            except SignatureError as exc:
                out.problems.append(f"{link.action} {link.kid} signed by {link.signer}: {exc}")
                continue
            if link.action == "add":
                try:
                    key = PublicKey.from_text(link.key)
                except BadKey as exc:
                    out.problems.append(f"add {link.kid}: {exc}")
                    continue
                if key.kid != link.kid:
                    out.problems.append(f"add {link.kid}: the key's id is {key.kid}")
                elif key.kid not in out.retired and key.kid not in out.trusted:
                    out.trusted[key.kid] = key
                    out.added.append(key.kid)
            elif link.kid != link.signer and link.kid not in out.retired:
                out.retired.add(link.kid)
                if out.trusted.pop(link.kid, None) is not None:
                    out.dropped.append(link.kid)
    return out
