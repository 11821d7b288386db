"""Names of the calibration choices, importable without torch (the CLI's parsers list them)."""

OBSERVERS = ("minmax", "percentile", "mse")
GRANULARITIES = ("tensor", "channel")
WEIGHT_METHODS = ("auto", "gptq", "adaround", "refine", "gptq+refine", "adaround+refine", "none")
