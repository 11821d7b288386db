"""sensitivity: mixed 3/4-bit weight quantization of diffusion denoisers, with measurements.

Pipeline (each stage only imports earlier ones)::

    zoo (model) -> layers -> quantizers -> multiquantizer -> evaluation (sampler, cache)
      -> graph -> predictors -> search -> insights
"""

__version__ = "0.1.0"
