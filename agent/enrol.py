"""``outpost-agent enroll``: give this device an identity the hub trusts.

1. Make the device's Ed25519 key pair in ``<state_dir>/identity/device.key``
   (0600, in a 0700 folder). The private key never leaves the device: only
   the public key is sent.
2. ``POST /api/v1/enroll`` over HTTPS with the one-time token.
3. Store what the hub answered: the broker address and this device's own
   broker credentials (and hub_url, hub_ca) in
   ``<state_dir>/identity/enrolment.json`` (0600), which ``load_settings``
   reads under the configuration file; the hub's public keys in
   ``hub-keys.json`` (agent/identity.py).

An enrolled device refuses to enrol again without ``force``: that would
replace its key, and the hub would then refuse the old one.
"""

from __future__ import annotations

import json
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.config import ENROLMENT_FILE, AgentSettings
from agent.identity import device_key_path, identity_dir, save_trusted_hub_keys
from shared.errors import OutpostError
from shared.files import atomic_write
from shared.signing import BadKey, PublicKey, SigningKey


class EnrolmentFailed(OutpostError):
    """The device could not enrol."""

    code = "enrolment_failed"


@dataclass(frozen=True)
class Enrolled:
    agent_id: str
    key_id: str
    broker: dict[str, Any] | None
    enrolment_file: Path


def enrol(
    settings: AgentSettings, hub_url: str, token: str, agent_id: str | None = None, ca_file: str | None = None,
    force: bool = False, timeout: float = 30.0,
) -> Enrolled:
    """Enrol this device (see the module docstring). Raises EnrolmentFailed."""
    hub_url = hub_url.rstrip("/")
    if not hub_url.startswith("https://"):
        raise EnrolmentFailed(f"the hub URL must start with https:// (got {hub_url!r}): the token and the broker password travel in this exchange")
    if ca_file is not None and not Path(ca_file).is_file():
        raise EnrolmentFailed(f"CA file {ca_file} does not exist")
    folder = identity_dir(settings)
    enrolment_file = settings.state_dir / ENROLMENT_FILE
    if enrolment_file.exists() and not force:
        raise EnrolmentFailed(f"this device is enrolled already ({enrolment_file}); enrolling again makes a new key the hub must accept: use --force")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key, is_new = _device_key(settings, fresh=force)
    body = {"token": token, "agent_id": agent_id, "public_key": key.public.to_text()}
    try:
        response = httpx.post(f"{hub_url}/api/v1/enroll", json=body, timeout=timeout, verify=ssl.create_default_context(cafile=ca_file) if ca_file else True)
    except httpx.HTTPError as exc:
        raise EnrolmentFailed(f"cannot reach the hub at {hub_url}: {exc}") from None
    answer = _answer(response)
    enrolled_id = str(answer["agent_id"])
    if agent_id is not None and enrolled_id != agent_id:
        raise EnrolmentFailed(f"the hub enrolled this device as {enrolled_id!r}, not {agent_id!r}")
    try:
        hub_keys = [PublicKey.from_text(text) for text in answer.get("hub_public_keys") or []]
    except BadKey as exc:
        raise EnrolmentFailed(f"the hub sent a bad public key: {exc}") from None
    values: dict[str, Any] = {"agent_id": enrolled_id, "hub_url": hub_url}
    if ca_file is not None:
        # A copy in the state folder: the device keeps working if the file given is removed.
        copied = folder / "hub-ca.pem"
        shutil.copyfile(ca_file, copied)
        copied.chmod(0o600)
        values["hub_ca"] = str(copied)
    broker = answer.get("broker")
    if isinstance(broker, dict):
        values.update(broker_host=broker["host"], broker_port=int(broker["port"]), broker_username=broker["username"], broker_password=broker["password"])
        if broker.get("tls"):
            values["broker_tls"] = True
            if ca_file is not None:
                values["tls_ca"] = values["hub_ca"]
    labels = answer.get("labels")
    if isinstance(labels, dict) and labels:
        values["labels"] = {str(k): str(v) for k, v in labels.items()}
    if is_new:
        # Only now: a failed attempt must not replace the key of an enrolled device.
        key.save(device_key_path(settings))
    if hub_keys:
        save_trusted_hub_keys(settings, hub_keys)
    atomic_write(enrolment_file, json.dumps(values, indent=2).encode() + b"\n", mode=0o600)
    shown = {k: v for k, v in (broker or {}).items() if k != "password"} if isinstance(broker, dict) else None
    return Enrolled(enrolled_id, key.kid, shown, enrolment_file)


def _device_key(settings: AgentSettings, fresh: bool) -> tuple[SigningKey, bool]:
    """The device key and whether it is new (saved once the hub accepted
    it): the existing one (a retried enrolment, a pre-registered device)
    unless ``fresh``."""
    path = device_key_path(settings)
    if path.exists() and not fresh:
        try:
            return SigningKey.load(path), False
        except BadKey as exc:
            raise EnrolmentFailed(str(exc)) from None
    return SigningKey.generate(), True


def _answer(response: httpx.Response) -> dict[str, Any]:
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.status_code != 200 or not isinstance(doc, dict):
        error = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(error, dict):
            raise EnrolmentFailed(f"the hub refused the enrolment ({response.status_code} {error.get('code')}): {error.get('message')}")
        raise EnrolmentFailed(f"the hub answered {response.status_code}: {response.text[:200]}")
    if not isinstance(doc.get("agent_id"), str):
        raise EnrolmentFailed("the hub's answer has no agent_id")
    return doc
