"""Pre-training presets (``tiny.yaml``, ``small.yaml``, ``base.yaml``), read by
``genecompass.train.PretrainConfig``."""
