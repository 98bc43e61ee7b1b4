"""The ``firmware.update`` job type: A/B firmware updates on a device root.

``slots`` (slot state, install, switch, commit, roll back, device hooks),
``download`` (resumable, size-capped, hash-checked download from the hub),
``job`` (the job itself: a step machine with checkpoints under
``<device root>/ota``). Importing this package has no side effects beyond
registering the job type when ``job`` is imported.
"""
