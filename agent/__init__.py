"""The Outpost agent: the daemon that runs on each edge device.

Modules, outermost first: ``cli`` (``outpost-agent`` commands, logging, exit
codes), ``daemon`` (composition root and lifecycle), then ``runner``
(schedules claimed assignments onto workers), ``sync`` (drains the outbox to
the hub), ``link`` (this device's MQTT session) and ``verify`` (admission
checks), which never import each other; below ``runner``, ``attempt`` (runs
one assignment and stores its result); below them ``queues`` (the durable
inbox and outbox) and ``config`` (``AgentSettings``). Importing this package
imports nothing else.
"""

__version__ = "0.1.0"
