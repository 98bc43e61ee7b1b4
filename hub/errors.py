"""Hub errors. Each carries the HTTP status the API answers with and a
stable ``code``; one handler in ``hub.api.app`` renders them all as
``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

from shared.errors import OutpostError


class HubError(OutpostError):
    status = 500
    code = "hub_error"


class NotFound(HubError):
    """The object does not exist."""

    status = 404
    code = "not_found"


class Conflict(HubError):
    """The request conflicts with the object's current state."""

    status = 409
    code = "conflict"


class InvalidRequest(HubError):
    """The request is not valid."""

    status = 422
    code = "invalid_request"


class InvalidDag(HubError):
    """A DAG file or DAG definition is not valid."""

    status = 422
    code = "invalid_dag"


class DagNotFound(NotFound):
    code = "dag_not_found"


class RunNotFound(NotFound):
    code = "run_not_found"


class AgentNotFound(NotFound):
    code = "agent_not_found"


class PoolNotFound(NotFound):
    code = "pool_not_found"


class ConfigError(HubError):
    """A hub setting is missing or invalid."""

    code = "config_error"


class Unauthorized(HubError):
    """No credentials, or the wrong ones."""

    status = 401
    code = "unauthorized"


class BatchTooLarge(HubError):
    """A sync batch over ``sync_max_batch_items`` or ``sync_max_batch_bytes``."""

    status = 413
    code = "batch_too_large"


class DatabaseUnavailable(HubError):
    """The metadata DB cannot be reached or is locked; nothing was applied."""

    status = 503
    code = "database_unavailable"


class Forbidden(HubError):
    """Authenticated, but the role does not allow it."""

    status = 403
    code = "forbidden"


class RateLimited(HubError):
    """Too many attempts; ``retry_after`` seconds until the next is allowed."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AgentNotTrusted(HubError):
    """An agent with no registered public key, or a revoked one: nothing it sends is applied."""

    status = 403
    code = "agent_not_trusted"
