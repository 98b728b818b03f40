"""The control plane client: the contract is ``docs/mass-api.yaml``; ``transport`` (HTTPS with
the pinned key, the JSON envelope), ``mass`` (one method per route), ``link`` (the service's
thread: register, heartbeat, tasks, commands, the outbox), ``check`` (``hamal mass check``)."""
