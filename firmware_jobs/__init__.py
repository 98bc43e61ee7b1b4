"""The job types an Outpost agent can run.

Modules: ``base`` (the ``Job`` base, the ``JobContext`` protocol, job errors
and the parameter-schema validator), ``registry`` (registration, lookup and
the advertised catalog), and one module per job type: ``command``
(``command.run``), ``diagnostics`` (``diagnostics.collect``) and ``noop``.
Importing this package imports no job module; ``registry`` loads them.
"""

from firmware_jobs import registry
from firmware_jobs.base import Job, JobAborted, JobContext, JobError

__all__ = ["Job", "JobAborted", "JobContext", "JobError", "registry"]
