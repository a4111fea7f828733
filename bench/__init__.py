"""Side-by-side fan-out benchmark of hub against a websockets ceiling and python-socketio.

Run ``python -m bench --help``; docs/benchmarks.md explains the workload and the figures.
Modules: ``cli`` (flags, the session loop), ``runner`` (one stack x N: server, clients,
rate sweep), ``client`` (load-generator processes), ``publisher`` (the publisher process),
``stacks`` (how each stack starts), ``procs`` (child processes, psutil figures),
``report`` (table, ratios, JSON, plots), ``ceiling_server`` and ``socketio_server``
(the two reference servers).
"""
