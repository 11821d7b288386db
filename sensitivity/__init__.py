"""sensitivity: mixed 3/4-bit weight quantization of diffusion denoisers, with measurements.

Pipeline (each stage only imports earlier ones)::

    zoo (model) -> layers -> quantizers -> multiquantizer -> evaluation (sampler, cache)
      -> graph -> predictors -> search -> insights
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import sensitivity` stays torch-free (the CLI starts without torch).
    if name == "load_quantized":
        from .export import load_quantized

        return load_quantized
    raise AttributeError(f"module 'sensitivity' has no attribute {name!r}")
