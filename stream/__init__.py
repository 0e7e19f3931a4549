"""The streaming worker (``worker start``): Kafka events → Redis-backed windows → micro-batched
inference → forecasts. Read in this order (the order a batch meets them, docs/design.md "How a
batch flows"):

- ``settings``     — frozen settings (Kafka, Redis, worker) built once from flags/YAML/env;
- ``worker``       — the façade: builds the pieces below, starts, runs, stops;
- ``runtime``      — start-up and what both engines share (model, Redis, topics, publisher);
- ``pipeline``     — the three concurrent stages, in-flight slots, the rebalance gate;
- ``consumer``     — the micro-batcher, and bounded offset-range reads (``read_ranges``: the
  rebuild replayer, the trainer's ``kafka://`` replay, ``dlq replay``, ``worker plot``);
- ``budget``       — the latency budget: what a batch costs (learnt online) and how large the next
  one may be so that a record's fetch → publish time stays within ``--latency-budget-ms``;
- ``batch``        — one batch: prepare → infer → complete;
- ``partitions``   — the assigned partitions' state: load, reset, persist, revoke; ``rebuild``
  restores stored windows and rebuilds lost ones exactly from the input topic;
- ``windows``      — admission of records into a partition's windows (ordering, limits, idle clock);
- ``rings``        — the ring buffers under the windows, and the blob Redis stores per series;
- ``decode``       — one record → ``Event`` or ``Rejection`` (the contract's reasons; total);
- ``inference``    — the model on a batch of windows, in a thread;
- ``calibration``  — online interval calibration: per series, side, level and step, a factor on
  the model's half-widths, learnt from each forecast's realised error, stored with the windows;
- ``publisher``    — forecast and dead-letter encoding, idempotent and transactional producers;
- ``delivery``     — at-least-once and exactly-once: publish, persist, commit;
- ``store``        — the Redis layout and the fenced atomic write;
- ``redis_guard``  — Redis calls under the retry policy, with deliberate pauses;
- ``health``       — pauses and watchdogs behind ``/readyz`` and ``/healthz``; ``metrics`` the
  Prometheus collectors and the HTTP endpoint;
- ``reloader``, ``accuracy``, ``shadow`` — hot reload, online accuracy, a challenger version;
- ``faust_engine`` — ``--engine faust``: the same pieces with Faust as the consumer;
- ``commands``     — ``worker start``, ``worker topics create``, ``worker status`` (the entry
  point is ``deploy/cli.py``); ``settings`` the worker's and the connections' settings;
  ``config`` one pydantic field per setting -> its flag, ``EVENTCAST_*`` variable and YAML key;
- ``faults``, ``retry``, ``diagnostics`` — test-only fault hooks, the retry policy, stack dumps.
"""
