"""The artifact store's tables (``hub.artifacts``): firmware images with
their signed release manifests, and which agents fetched them.

The image bytes live on disk (``HubSettings.artifacts_path``), never in the
database; a row says what the file must be (size, SHA-256) and whether it
arrived whole (``state`` ``ready``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from hub.models import Base


class Artifact(Base):
    __tablename__ = "artifacts"

    #: The manifest's ``artifact_id``: ``<name>-<version>``.
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[str] = mapped_column(String(100))
    security_version: Mapped[int] = mapped_column(Integer, default=0)
    #: Hardware models it fits (empty: any).
    hardware: Mapped[list[Any]] = mapped_column(default=list)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    #: The signed manifest document exactly as uploaded (JSON text), served to agents as is.
    document: Mapped[str] = mapped_column(Text)
    #: ``pending`` (manifest only) or ``ready`` (the image is on disk and matched the manifest).
    state: Mapped[str] = mapped_column(String(20), default="pending")
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(200), default="")
    ready_at: Mapped[datetime | None]
    #: Image requests served (each range request counts: a resumed download is several).
    downloads: Mapped[int] = mapped_column(BigInteger, default=0)
    last_download_at: Mapped[datetime | None]


class ArtifactFetch(Base):
    """One agent's fetches of one artifact: bounded at one row per device
    and release however often it resumes."""

    __tablename__ = "artifact_fetches"

    artifact_id: Mapped[str] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    #: Whether a request was served up to the image's last byte.
    completed: Mapped[bool] = mapped_column(default=False)
    first_at: Mapped[datetime]
    last_at: Mapped[datetime]
