"""``firmware.update``: install a released firmware image into the inactive
A/B slot, switch to it on trial, check its health, then commit or roll back.

Steps (each a checkpoint; the slot state in ``ota/state.json`` is the source
of truth, ``ota/update.json`` a journal of the step reached and the manifest):

1. **download** the image from the hub (resumable, size-capped, hashed);
2. **verify**: a trusted release key signed the manifest, the hardware model
   fits, anti-rollback (``security_version`` never below the committed
   floor; a lower ``version`` only when the manifest allows downgrades), the
   image's SHA-256;
3. **install** into the inactive slot (copy, fsync, slot metadata last);
4. **switch**: ``active`` names the new slot with a pending trial, in one
   atomic write; then the device's ``switch-slot`` and ``reboot`` hooks;
5. **health check**: the ``health-check`` hook exits 0 within
   ``health_timeout`` (without a hook: the new slot's image still hashes
   right); then **commit** (``commit-slot`` hook, floor raised, trial
   cleared) or **roll back** (previous slot active again, non-retryable
   ``health_check_failed``).

Idempotent and crash-safe: re-running an assignment resumes from what the
device holds. A finished update reports ``already_installed`` without
touching a slot; a trial boot of the same release continues at its health
check; a trial left by another release whose job was lost is rolled back
first (nobody confirmed it); a failure of this same assignment (say the
agent died after rolling back but before reporting) is reported again
rather than retried.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from firmware_jobs.base import Job, JobAborted, JobContext, JobError
from firmware_jobs.devroot import DeviceRoot
from firmware_jobs.ota import slots
from firmware_jobs.ota.download import Hub
from firmware_jobs.registry import register
from shared.files import atomic_write
from shared.release import ManifestError, SignedManifest, compare_versions, load
from shared.signing import BadKey, PublicKey, SignatureError

_ARTIFACT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
#: Test hook: ``<step>:<file>`` makes the job write ``<file>`` on reaching
#: ``<step>`` and then hang until killed (the kill -9 tests). Read only when set.
HALT_ENV = "OUTPOST_OTA_TEST_HALT"
#: Seconds a switch-slot, reboot or commit-slot hook may take.
HOOK_TIMEOUT = 120.0


@register
class FirmwareUpdate(Job):
    """See the module docstring."""

    name = "firmware.update"
    version = "1.0.0"
    description = "Download a released firmware image, verify its signed manifest, install it into the inactive A/B slot, switch, health-check, then commit or roll back."
    params_schema = {
        "type": "object",
        "properties": {
            "artifact_id": {"type": "string", "minLength": 1, "maxLength": 200, "description": "The release to install: <name>-<version>."},
            "manifest": {"type": ["object", "null"], "description": "The signed manifest document; absent: fetched from the hub."},
            "health_timeout": {"type": "number", "minimum": 1, "maximum": 86400, "default": 60,
                               "description": "Seconds the new image has to pass its health check."},
        },
        "required": ["artifact_id"],
        "additionalProperties": False,
    }

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        return _Update(ctx, params).run()


class _Update:
    def __init__(self, ctx: JobContext, params: dict[str, Any]) -> None:
        self.ctx = ctx
        self.artifact_id = params["artifact_id"]
        if not _ARTIFACT_ID.match(self.artifact_id):
            raise JobError(f"artifact_id {self.artifact_id!r} is not <name>-<version>", "invalid_params", retryable=False)
        self.given = params.get("manifest")
        self.health_timeout = float(params.get("health_timeout", 60))
        root = ctx.settings.get("device_root")
        if not root:
            raise JobError("the agent gives no device_root setting; firmware.update needs one", "no_device_root", retryable=False)
        self.root = DeviceRoot(root)
        self.journal = self.root.ota_dir / "update.json"
        hub_url = ctx.settings.get("hub_url")
        self.hub = Hub(hub_url, ctx.signed_headers, ctx.settings.get("hub_ca") or True) if hub_url else None

    # --- the step machine ----------------------------------------------------

    def run(self) -> dict[str, Any]:
        with slots.UpdateLock(self.root):
            state = slots.load_state(self.root)
            signed = self._manifest()
            manifest = signed.manifest
            pending = state["pending"]
            if pending is not None:
                if pending["artifact_id"] == manifest.artifact_id:
                    self.ctx.log(f"resuming the trial of {manifest.artifact_id} in slot {pending['slot']} (phase {pending['phase']})")
                    return self._trial(state, signed)
                self.ctx.log(f"a trial of {pending['artifact_id']} was left unconfirmed (its job was lost): rolling it back first")
                self._roll_back(state, "trial_abandoned", f"trial of {pending['artifact_id']} abandoned for {manifest.artifact_id}")
            failure = state.get("last_failure") or {}
            if failure.get("assignment_id") == self.ctx.assignment_id and failure.get("artifact_id") == manifest.artifact_id:
                raise JobError(str(failure.get("message")), str(failure.get("code")), retryable=False)
            active = state["slots"][state["active"]]
            if active.get("artifact_id") == manifest.artifact_id and active.get("sha256") == manifest.sha256:
                self.ctx.log(f"{manifest.artifact_id} is already installed and committed in slot {state['active']}")
                return self._result(state, "already_installed", None)
            self._verify(signed, state)
            self._note("download", signed)
            image = self._download(signed)
            _checkpoint("downloaded")
            self._verify(signed, state)
            if slots.sha256_file(image, self.ctx.should_abort) != manifest.sha256:
                image.unlink()
                raise JobError(f"the image of {manifest.artifact_id} does not match the manifest's SHA-256", "hash_mismatch", retryable=False)
            self._note("verified", signed)
            self.ctx.progress(0.75, "verified")
            _checkpoint("verified")
            target = slots.other(state["active"])
            slots.clear_slot(self.root, state, target)
            meta = slots.install(self.root, target, image, manifest, self.ctx.clock.now(), _checkpoint)
            self._note("installed", signed)
            self.ctx.progress(0.85, f"installed in slot {target}")
            _checkpoint("installed")
            slots.begin_switch(self.root, state, target, meta, self.ctx.assignment_id, self.ctx.clock.now())
            return self._trial(state, signed)

    def _trial(self, state: dict[str, Any], signed: SignedManifest) -> dict[str, Any]:
        pending = state["pending"]
        slot, previous = pending["slot"], pending["previous"]
        if pending["phase"] == "rolling_back":
            failure = pending.get("failure") or {"code": "health_check_failed", "message": "rolled back"}
            self._roll_back(state, failure["code"], failure["message"])
            raise JobError(failure["message"], failure["code"], retryable=False)
        if pending["phase"] == "switching":
            try:
                slots.call_hook(self.root, "switch-slot", [slot, "trial"], HOOK_TIMEOUT, self.ctx.log)
            except JobError as exc:
                self._roll_back(state, "switch_failed", str(exc))
                raise JobError(f"switching to slot {slot} failed, stayed on slot {previous}: {exc}", "switch_failed", retryable=True) from None
            slots.set_phase(self.root, state, "trial")
            self.ctx.progress(0.9, f"switched to slot {slot}")
            _checkpoint("switched")
            # A real device goes down here; the agent re-runs this assignment
            # after the boot and lands in the health check below.
            try:
                slots.call_hook(self.root, "reboot", [], HOOK_TIMEOUT, self.ctx.log)
            except JobError as exc:
                self._fail_trial(state, "reboot_failed", str(exc))
        healthy, detail = self._health(slot, state["slots"][slot])
        if not healthy:
            if self.ctx.should_abort():
                raise JobAborted("stopping during the health check; it runs again when the job resumes")
            self._fail_trial(state, "health_check_failed", detail)
        _checkpoint("healthy")
        try:
            slots.call_hook(self.root, "commit-slot", [slot], HOOK_TIMEOUT, self.ctx.log)
        except JobError as exc:
            self._fail_trial(state, "commit_failed", str(exc))
        previous_version = (state["slots"].get(previous) or {}).get("version")
        slots.commit(self.root, state, self.ctx.clock.now())
        self._clean(signed)
        self.ctx.progress(1.0, f"committed {signed.manifest.version} in slot {slot}")
        return self._result(state, "installed", previous_version)

    def _fail_trial(self, state: dict[str, Any], code: str, detail: str) -> None:
        pending = state["pending"]
        old = (state["slots"].get(pending["previous"]) or {}).get("version", "?")
        message = f"{code.replace('_', ' ')} for {pending['artifact_id']} in slot {pending['slot']}: {detail}; rolled back to slot {pending['previous']} ({old})"
        self._roll_back(state, code, message)
        raise JobError(message, code, retryable=False)

    def _roll_back(self, state: dict[str, Any], code: str, message: str) -> None:
        pending = state["pending"]
        pending["failure"] = {"code": code, "message": message}
        slots.set_phase(self.root, state, "rolling_back")
        self.ctx.log(f"rolling back to slot {pending['previous']}: {message}")
        slots.call_hook(self.root, "switch-slot", [pending["previous"], "rollback"], HOOK_TIMEOUT, self.ctx.log)
        slots.roll_back(self.root, state, code, message)
        try:
            slots.call_hook(self.root, "reboot", [], HOOK_TIMEOUT, self.ctx.log)
        except JobError as exc:
            self.ctx.log(f"reboot after the rollback failed: {exc}")

    # --- the pieces ----------------------------------------------------------

    def _manifest(self) -> SignedManifest:
        document: Any = self.given
        if document is None:
            noted = _read_json(self.journal)
            if noted.get("artifact_id") == self.artifact_id and isinstance(noted.get("manifest"), dict):
                document = noted["manifest"]
        if document is None:
            if self.hub is None:
                raise JobError("no manifest given and no hub_url to fetch it from", "no_hub_url", retryable=False)
            document = self.hub.manifest(self.artifact_id)
        try:
            signed = load(document)
        except ManifestError as exc:
            raise JobError(f"the manifest of {self.artifact_id} is invalid: {exc}", "bad_manifest", retryable=False) from None
        if signed.manifest.artifact_id != self.artifact_id:
            raise JobError(f"the manifest is for {signed.manifest.artifact_id}, not {self.artifact_id}", "bad_manifest", retryable=False)
        return signed

    def _verify(self, signed: SignedManifest, state: dict[str, Any]) -> None:
        """Everything about the manifest; non-retryable: another try cannot fix it."""
        try:
            kid = signed.verify(self._release_keys()).kid
        except SignatureError as exc:
            raise JobError(f"manifest of {signed.manifest.artifact_id} refused: {exc}", exc.code, retryable=False) from None
        manifest = signed.manifest
        model = self.root.hardware_model()
        if not manifest.fits(model):
            raise JobError(f"{manifest.artifact_id} is for hardware {', '.join(manifest.hardware)}, this device is {model}", "wrong_hardware", retryable=False)
        floor = state["rollback_floor"]
        if manifest.security_version < floor:
            raise JobError(f"{manifest.artifact_id} has security_version {manifest.security_version}, below this device's anti-rollback floor {floor}",
                           "rollback_refused", retryable=False)
        running = state["slots"][state["active"]].get("version") or "0.0.0"
        try:
            lower = compare_versions(manifest.version, running) < 0
        except ManifestError:
            lower = False  # a factory version that is not dotted cannot be compared
        if lower and not manifest.allow_downgrade:
            raise JobError(f"{manifest.artifact_id} is older than the running {running} and its manifest does not allow downgrades",
                           "downgrade_refused", retryable=False)
        self.ctx.log(f"manifest of {manifest.artifact_id} verified (release key {kid}, hardware {model}, security_version {manifest.security_version} >= {floor})")

    def _release_keys(self) -> list[PublicKey]:
        keys = []
        for text in self.ctx.settings.get("release_keys") or []:
            try:
                keys.append(PublicKey.from_text(text))
            except BadKey as exc:
                self.ctx.log(f"ignoring an unreadable release key: {exc}")
        return keys

    def _download(self, signed: SignedManifest) -> Path:
        if self.hub is None:
            raise JobError("the agent has no hub_url to download the image from", "no_hub_url", retryable=False)
        last = [-1.0]

        def progress(have: int, size: int) -> None:
            fraction = 0.7 * have / size
            if fraction - last[0] >= 0.01 or have == size:
                last[0] = fraction
                self.ctx.progress(fraction, f"downloaded {have} of {size} bytes")

        downloads = self.root.downloads_dir
        if downloads.is_dir():
            # Leftovers of other releases (a refused or abandoned update) only take space.
            for stale in downloads.iterdir():
                if stale.is_file() and stale.name not in (f"{self.artifact_id}.part", f"{self.artifact_id}.img"):
                    stale.unlink(missing_ok=True)
        return self.hub.image(signed.manifest, downloads, progress, self.ctx.should_abort, self.ctx.log)

    def _health(self, slot: str, meta: dict[str, Any]) -> tuple[bool, str]:
        version = str(meta.get("version"))
        if self.root.hook("health-check") is None:
            ok = slots.slot_holds(self.root, slot, str(meta.get("sha256")))
            return ok, "built-in check: the slot's image " + ("matches" if ok else "no longer matches") + " its hash"
        deadline = time.monotonic() + self.health_timeout
        last = "not run"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False, f"health-check hook did not pass within {self.health_timeout:g}s (last: {last})"
            outcome = slots.run_hook(self.root, "health-check", [slot, version], remaining, {"OUTPOST_SLOT": slot, "OUTPOST_VERSION": version})
            assert outcome is not None
            status, text = outcome
            if status == 0:
                self.ctx.log(f"health check of {version} in slot {slot} passed" + (f": {text}" if text else ""))
                return True, text
            last = f"exit {status}" + (f": {text[-300:]}" if text else "")
            self.ctx.log(f"health check of {version} in slot {slot}: {last}")
            if self.ctx.should_abort():
                return False, last
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _note(self, step: str, signed: SignedManifest) -> None:
        doc = {"artifact_id": signed.manifest.artifact_id, "assignment_id": self.ctx.assignment_id, "step": step, "manifest": signed.to_dict()}
        atomic_write(self.journal, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")

    def _clean(self, signed: SignedManifest) -> None:
        (self.root.downloads_dir / f"{signed.manifest.artifact_id}.img").unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)

    def _result(self, state: dict[str, Any], status: str, previous_version: str | None) -> dict[str, Any]:
        meta = state["slots"][state["active"]]
        return {"status": status, "artifact_id": meta.get("artifact_id"), "version": meta.get("version"), "slot": state["active"],
                "previous_version": previous_version, "security_version": meta.get("security_version"), "rollback_floor": state["rollback_floor"]}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _checkpoint(step: str) -> None:
    spec = os.environ.get(HALT_ENV)
    if not spec:
        return
    name, _, path = spec.partition(":")
    if name != step:
        return
    Path(path).write_text(step)
    while True:  # until the test kills this process
        time.sleep(0.05)
