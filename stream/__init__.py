"""The streaming worker (``worker start``): Kafka events → Redis-backed windows → micro-batched
inference → forecasts. Read in this order:

- ``settings``  — frozen settings (Kafka, Redis, worker) built once from flags/YAML/env;
- ``decode``    — one record → ``Event`` or ``Rejection`` (CONTRACT.md reasons);
- ``windows``   — a partition's in-memory ring buffers: ordering checks, limits, window gathering;
- ``store``     — the Redis layout, fenced atomic persistence, ``read_window`` for other services;
- ``consumer``  — the micro-batcher and the replayer that rebuilds lost windows from Kafka;
- ``inference`` — model inputs and inference in a thread;
- ``publisher`` — forecast encoding, idempotent and transactional producers;
- ``reloader``  — hot reload of the model directory's ``CURRENT`` (and SIGHUP);
- ``metrics``   — Prometheus metrics, ``/metrics`` ``/healthz`` ``/readyz``;
- ``worker``    — the loop that ties them together (invariants of DESIGN.md);
- ``commands``  — ``worker start``, ``worker topics create``, ``worker status``;
- ``faults``    — test-only ``EVENTCAST_FAULT`` kill hook; ``retry`` — the Redis retry policy.
"""
