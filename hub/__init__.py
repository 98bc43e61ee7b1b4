"""The Outpost hub: metadata DB, DAG parsing, scheduler, dispatcher, event
ingestion, REST API, dashboard and CLI.

Modules (layers, top to bottom): ``cli``, ``standalone`` → ``api``, ``web`` →
``scheduler``, ``ingest``, ``outbox``, ``dispatcher``, ``fleet``,
``executor`` → ``dagbag``, ``dag``, ``trigger_rules``, ``targeting``,
``models``, ``db``, ``events`` → ``config``, ``errors``. ``ctl`` is the
operator CLI, a REST client. Importing this package imports neither FastAPI
nor SQLAlchemy: DAG files import ``hub.dag`` only.
"""
