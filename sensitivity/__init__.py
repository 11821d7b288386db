"""sensitivity: mixed 3/4-bit weight quantization of diffusion denoisers, with measurements.

One subpackage per stage; data flows one way. The layering (which module may import which) is stated
once, in the table of ``docs/ARCHITECTURE.md``, and enforced by ``tests/test_architecture.py``.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import sensitivity` stays torch-free (the CLI starts without torch).
    if name == "load_quantized":
        from .export import load_quantized

        return load_quantized
    raise AttributeError(f"module 'sensitivity' has no attribute {name!r}")
