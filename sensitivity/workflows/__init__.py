"""Whole workflows as functions: what a ``sensitivity`` command does, callable from a notebook or a benchmark.

* :mod:`.multiquantize` — :func:`~.multiquantize.multiquantize`: load a model and build its multiquantizer;
* :mod:`.sample` — :func:`~.sample.sample`: an evaluation job (random / active / single-layer configs
  into a resumable cache, on local workers, devices or Ray);
* :mod:`.evaluate` — :func:`~.evaluate.evaluate_config`: one config (or calibrated / fine-tuned
  artifact) with a job's protocol, looked up in and stored to a cache;
* :mod:`.demo` — the demo's named steps (:func:`~.demo.run_demo` runs them all).

The last stage before the CLI: these modules may use every stage; ``sensitivity/commands/`` parses
arguments, calls one of them and prints. Imported lazily (nothing here is imported by ``sensitivity``).
"""
