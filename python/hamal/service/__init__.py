"""The sync proxy service: ``hamal-period`` (period.py) runs each task's cycles in worker
processes (worker.py), keeps its state in SQLite (state.py) and reports through logs, ``hamal
status`` / ``health`` / ``task`` and Prometheus metrics. See ARCHITECTURE.md, "The service"."""
