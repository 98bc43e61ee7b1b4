"""``outpost artifacts upload|list|show|delete``: the hub's artifact store
(docs/fleet.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hub.ctl.errors import CtlError, ExitCode
from hub.ctl.http import HubClient
from hub.ctl.output import emit, fields, output_parent, page_note, table, when
from hub.ctl.parsing import add_command, add_noun, paging_parent
from shared.release import ManifestError, load

_CHUNK = 256 * 1024


def register(nouns: Any) -> None:
    verbs = add_noun(nouns, "artifacts", "Upload firmware images with their signed manifests, and list, show or delete them.",
                     ["outpost artifacts upload fw.bin --manifest fw.manifest.json", "outpost artifacts list --name sensor-fw"])
    out = output_parent()

    cmd = add_command(verbs, "upload", "Register a signed manifest with the hub, then stream its image (checked against the manifest).", upload,
                      ["outpost artifacts upload fw.bin --manifest fw.manifest.json"], [out])
    cmd.add_argument("image", metavar="IMAGE", help="the firmware image file")
    cmd.add_argument("--manifest", required=True, metavar="PATH", help="its signed manifest (outpost release sign)")
    cmd.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds each network read or write may take (default 60)")

    cmd = add_command(verbs, "list", "List artifacts, newest first.", list_artifacts,
                      ["outpost artifacts list", "outpost artifacts list --name sensor-fw --state ready -o json"], [out, paging_parent()])
    cmd.add_argument("--name", help="only this release name")
    cmd.add_argument("--state", choices=("pending", "ready"), help="only pending or ready artifacts")

    cmd = add_command(verbs, "show", "Show one artifact: manifest fields, state, downloads and the agents that fetched it.", show_artifact,
                      ["outpost artifacts show sensor-fw-2.1.0", "outpost artifacts show sensor-fw-2.1.0 -o json"], [out])
    cmd.add_argument("artifact_id", metavar="ARTIFACT_ID")

    cmd = add_command(verbs, "delete", "Delete an artifact and its image (admin; refused while unfinished tasks name it).", delete_artifact,
                      ["outpost artifacts delete sensor-fw-2.0.0"])
    cmd.add_argument("artifact_id", metavar="ARTIFACT_ID")


def upload(client: HubClient, args: argparse.Namespace) -> None:
    image = Path(args.image)
    try:
        document = Path(args.manifest).read_bytes()
        manifest = load(document).manifest
        size = image.stat().st_size
    except ManifestError as exc:
        raise CtlError(f"{args.manifest}: {exc}", ExitCode.USAGE) from None
    except OSError as exc:
        raise CtlError(f"cannot read {exc.filename}: {exc.strerror}", ExitCode.USAGE) from None
    if size != manifest.size:
        raise CtlError(f"{image} is {size} bytes; the manifest says {manifest.size}: is it the image this manifest was signed for?", ExitCode.USAGE)
    path = f"/artifacts/{quote(manifest.artifact_id, safe='')}"
    registered = client.post_content("/artifacts", document)
    if registered["state"] == "ready":
        print(f"{manifest.artifact_id} is already on the hub; sending the image again (it must be the same bytes)", file=sys.stderr)
    with image.open("rb") as handle:
        record = client.put_stream(f"{path}/image", _progress(handle, size, sys.stderr.isatty()), size, timeout=args.timeout)
    emit(args, record, _text)


def _progress(handle: Any, size: int, show: bool) -> Iterator[bytes]:
    """The file's chunks; on a terminal, a progress line on stderr."""
    sent = 0
    while chunk := handle.read(_CHUNK):
        sent += len(chunk)
        if show:
            sys.stderr.write(f"\ruploading {sent * 100 // size:3d}%  {sent / 1e6:.1f}/{size / 1e6:.1f} MB")
            sys.stderr.flush()
        yield chunk
    if show:
        sys.stderr.write("\n")


def list_artifacts(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/artifacts", name=args.name, state=args.state, limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("ID", lambda a: a["id"]),
        ("STATE", lambda a: a["state"]),
        ("SIZE", lambda a: a["size"]),
        ("SECURITY", lambda a: a["security_version"]),
        ("HARDWARE", lambda a: ",".join(a["hardware"]) or "any"),
        ("DOWNLOADS", lambda a: a["downloads"]),
        ("CREATED", lambda a: when(a["created_at"])),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "artifacts")


def show_artifact(client: HubClient, args: argparse.Namespace) -> None:
    emit(args, client.get(f"/artifacts/{quote(args.artifact_id, safe='')}"), _text)


def delete_artifact(client: HubClient, args: argparse.Namespace) -> None:
    client.delete(f"/artifacts/{quote(args.artifact_id, safe='')}")
    print(f"deleted {args.artifact_id}")


def _text(a: dict[str, Any]) -> str:
    text = fields(a, [
        ("id", lambda a: a["id"]),
        ("state", lambda a: a["state"]),
        ("version", lambda a: a["version"]),
        ("security_version", lambda a: a["security_version"]),
        ("hardware", lambda a: ", ".join(a["hardware"]) or "any"),
        ("size", lambda a: a["size"]),
        ("sha256", lambda a: a["sha256"]),
        ("created", lambda a: f"{when(a['created_at'])} by {a['created_by']}"),
        ("ready_at", lambda a: when(a["ready_at"]) if a["ready_at"] else None),
        ("downloads", lambda a: a["downloads"]),
        ("signed_by", lambda a: ", ".join(s["kid"] for s in a["manifest"]["signatures"]) if "manifest" in a else None),
        ("fetched_by", lambda a: a.get("fetched_by")),
    ])
    fetches = a.get("fetches") or []
    if fetches:
        text += "\n\n" + table(fetches, [("AGENT", lambda f: f["agent_id"]), ("REQUESTS", lambda f: f["requests"]), ("COMPLETED", lambda f: f["completed"]), ("LAST", lambda f: when(f["last_at"]))])
    return text
