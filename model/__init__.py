"""The model: config, features, network and its Lightning module, predictors, and the model
directory. Read in this order: ``config`` (``ModelConfig``), ``features`` (one input builder for
training and serving), ``network`` (the LSTM + attention net, shapes in comments), ``module``
(the LightningModule), ``predictor`` (torch / onnxruntime backends), ``export`` (ONNX and its
parity check), then the model directory: ``layout`` (names, atomic steps), ``writer``,
``checks`` and ``loader`` (safe loading: manifest, checksums, canary), ``registry`` (versions and
the ``CURRENT`` pointer). Nothing here imports Kafka, Redis or the other packages.
"""
