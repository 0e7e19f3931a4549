"""The HTTP service of ``worker serve`` (docs/contract.md "HTTP POST /predict", docs/operations.md
§7), one concern per module:

- :mod:`~deploy.http.app`: ``create_app`` — wiring, the body-size limit, error answers, metrics;
- :mod:`~deploy.http.predict`: ``POST /predict`` and its validating request model;
- :mod:`~deploy.http.series`: ``GET /series/{id}``;
- :mod:`~deploy.http.admin`: ``/healthz``, ``/readyz``, ``/metrics``, ``POST /reload``;
- :mod:`~deploy.http.view`: the live view (Jinja2 template in ``deploy/web/``);
- :mod:`~deploy.http.feed`: forecasts read back from the forecast topic;
- :mod:`~deploy.http.state`: series windows in the worker's Redis;
- :mod:`~deploy.http.serving`: the serving model and forecasting one window;
- :mod:`~deploy.http.errors`, :mod:`~deploy.http.metrics`, :mod:`~deploy.http.settings`,
  :mod:`~deploy.http.server` (``run_server``).
"""
