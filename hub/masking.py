"""Masking of secret values (``***``) in what humans see.

Masked: the value of every variable whose key looks sensitive, every
connection's password and the secret-looking values of its extra, values a
DAG marks secret (``mask_secret``), and any value stored under a
sensitive-looking name (``password``, ``api_key``...) in data the API shows.
Where: hub log records (``install_log_filter``: the hub's processes and its
hub-task workers), stored task logs (hub.tasklogs) and API and dashboard
output of run conf, task outputs, errors and rendered fields (hub.queries).

Secret values come from a *source* (hub.vault reads the stored secrets;
refreshed at most every ``refresh_interval`` seconds, and at once after a
write in this process) plus the values registered in this process.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

MASK = "***"
#: Shorter values are not masked: masking "1" or "ok" would garble every log
#: line without hiding anything worth hiding.
MIN_SECRET_LENGTH = 4
#: Name parts that make a variable key, an extra field or a dict key secret.
SENSITIVE_PARTS = frozenset(
    {"password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "tokens", "key", "keys", "apikey", "private", "credential",
     "credentials", "auth", "authorization", "cookie"}
)
_SPLIT = re.compile(r"[^0-9a-zA-Z]+|(?<=[a-z0-9])(?=[A-Z])")

log = logging.getLogger(__name__)


def is_sensitive(name: object) -> bool:
    """Whether a key like ``API_KEY``, ``db-password``, ``privateKey`` or
    ``auth_token`` names a secret (split on separators and camel case; whole
    words only, so ``keyboard`` or ``monkey`` are not secrets)."""
    if not isinstance(name, str) or not name:
        return False
    parts = {p.lower() for p in _SPLIT.split(name) if p}
    return bool(parts & SENSITIVE_PARTS) or any(w in name.lower() for w in ("password", "passwd", "secret", "apikey", "api_key", "private_key", "access_key"))


def _leaves(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield str(value)


class Masker:
    """The secret values of this process and a source of stored ones."""

    def __init__(self, refresh_interval: float = 5.0) -> None:
        self.refresh_interval = refresh_interval
        self._lock = threading.Lock()
        self._registered: set[str] = set()
        self._stored: set[str] = set()
        self._source: Callable[[], Iterable[str]] | None = None
        self._loaded_at = float("-inf")
        self._pattern: re.Pattern[str] | None = None
        self._loading = False

    def set_source(self, source: Callable[[], Iterable[str]] | None) -> None:
        """Where stored secret values come from (hub.vault). Replaces the last."""
        with self._lock:
            self._source = source
            self._stored = set()
            self._loaded_at = float("-inf")
            self._pattern = None

    def invalidate(self) -> None:
        """A secret changed: read the source again at the next use."""
        with self._lock:
            self._loaded_at = float("-inf")

    def add(self, value: Any) -> None:
        """Mask ``value`` (a string, or each string and number inside a dict
        or list) from now on in this process."""
        new = {v for v in _leaves(value) if len(v) >= MIN_SECRET_LENGTH}
        if isinstance(value, str):
            new |= {line for line in value.splitlines() if len(line) >= MIN_SECRET_LENGTH}
        with self._lock:
            if not new <= self._registered:
                self._registered |= new
                self._pattern = None

    def _current(self) -> re.Pattern[str] | None:
        source = None
        with self._lock:
            if self._source is not None and not self._loading and time.monotonic() - self._loaded_at >= self.refresh_interval:
                source, self._loading = self._source, True
        if source is not None:
            try:
                stored = {v for v in source() if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH}
            except Exception as exc:  # the DB may be away; keep masking what we know
                stored = None
                # Not through the masked loggers' handlers: this is about the masker itself.
                log.debug("secret masker: cannot read stored secrets: %s", type(exc).__name__)
            with self._lock:
                self._loading = False
                self._loaded_at = time.monotonic()
                if stored is not None and stored != self._stored:
                    self._stored, self._pattern = stored, None
        with self._lock:
            if self._pattern is None:
                values = self._registered | self._stored
                if not values:
                    return None
                self._pattern = compile_alternatives(values)
            return self._pattern

    def mask_text(self, text: str) -> str:
        pattern = self._current()
        if pattern is None or not text:
            return text
        return pattern.sub(MASK, text)

    def redact(self, value: Any, name: str | None = None) -> Any:
        """A copy of ``value`` for humans: values under sensitive names are
        ``***``, known secret values inside strings are ``***``."""
        if name is not None and is_sensitive(name) and value not in (None, "", [], {}):
            return MASK
        if isinstance(value, str):
            return self.mask_text(value)
        if isinstance(value, dict):
            return {k: self.redact(v, k if isinstance(k, str) else None) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.redact(v) for v in value)
        return value


def compile_alternatives(values: Iterable[str]) -> re.Pattern[str]:
    """One regex matching any of ``values``, the longest where several
    match at one place. A plain ``a|b|c`` makes the regex engine try every
    value at every position of the text (0.6 s for a 64 KiB log with 1,000
    secrets); a trie of the values tries only the branches that match so
    far (bench/secret_store.py)."""
    trie: dict[str, Any] = {}
    for value in values:
        node = trie
        for ch in value:
            node = node.setdefault(ch, {})
        node[""] = {}
    try:
        return re.compile(_trie_regex(trie))
    except (RecursionError, re.error):  # pathological nesting: the slow form still works
        return re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))


def _trie_regex(node: dict[str, Any]) -> str:
    branches = []
    for ch, child in sorted(node.items()):
        if ch == "":
            continue
        run = [ch]
        # A chain of single-child nodes is one literal: nesting only at real branches.
        while len(child) == 1 and "" not in child:
            [(next_ch, child)] = child.items()
            run.append(next_ch)
        branches.append(re.escape("".join(run)) + _trie_regex(child))
    if not branches:
        return ""
    ends_here = "" in node
    if len(branches) == 1 and not ends_here:
        return branches[0]
    group = "(?:" + "|".join(branches) + ")"
    return group + "?" if ends_here else group  # greedy: the longer value wins


#: The masker of this process.
MASKER = Masker()


def mask_secret(value: Any) -> None:
    """Airflow's ``mask_secret``: a DAG marks ``value`` secret; it is
    masked in this process's logs and in the rendered fields it records."""
    MASKER.add(value)


class MaskingFilter(logging.Filter):
    """Replaces secret values in a record's message and traceback."""

    def __init__(self, masker: Masker | None = None) -> None:
        super().__init__()
        self.masker = masker or MASKER

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_outpost_masked", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it itself
            return True
        masked = self.masker.mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.masker.mask_text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.masker.mask_text(record.stack_info)
        record._outpost_masked = True
        return True


def install_log_filter(masker: Masker | None = None) -> MaskingFilter:
    """Mask secrets in everything this process logs: the filter goes on
    every handler of the root logger (a handler filter also sees records
    propagated from other loggers; a logger filter would not). A process
    without handlers gets one on stderr first, as ``logging.lastResort``
    (which no filter can be put on) would have printed."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    found = [f for h in root.handlers for f in h.filters if isinstance(f, MaskingFilter)]
    filt = found[0] if found else MaskingFilter(masker)
    for handler in root.handlers:
        if filt not in handler.filters:
            handler.addFilter(filt)
    return filt
