"""Whole workflows as functions: what a ``sensitivity`` command does, callable from a notebook or a benchmark.

* :mod:`.multiquantize` — :func:`~.multiquantize.multiquantize`: load a model and build its multiquantizer;
* :mod:`.sample` — :func:`~.sample.sample`: an evaluation job (random / active / single-layer configs
  into a resumable cache, on local workers, devices or Ray);
* :mod:`.evaluate` — :func:`~.evaluate.evaluate_config`: one config (or calibrated / fine-tuned
  artifact) with a job's protocol, looked up in and stored to a cache;
* :mod:`.demo` — the demo's named steps (:func:`~.demo.run_demo` runs them all);
* :mod:`.search` — :func:`~.search.search_configs`: configs at exact bit / memory / latency budgets,
  sweeps with their Pareto tables and plots, and the baselines;
* :mod:`.infer` — :func:`~.infer.infer`: images of a config, fine-tuned artifact or export, with ``run.json``;
* :mod:`.calibrate` — :func:`~.calibrate.calibration_data`: a calibration set;
  :func:`~.calibrate.calibrate_config`: a calibrated config folder;
* :mod:`.costs` — :func:`~.costs.measure_model_costs`: a model's cost table (latency, run-time bytes);
* :mod:`.layers` — :func:`~.layers.layer_report`: a model's quantizable layers under its family's rules;
* :mod:`.graph` — :func:`~.graph.model_graph_files`: a model's traced DAG saved and drawn;
* :mod:`.insights` — :func:`~.insights.insights_files`: tables and figures of scores, configs and records;
* :mod:`.finetune` — :func:`~.finetune.finetune_config`: quantization-aware fine-tuning of a config;
* :mod:`.components` — :func:`~.components.component_report`: the per-component quantization report;
* :mod:`.export` — :func:`~.export.export_model`: a config as a packed / sdnq / onnx model.

The last stage before the CLI: these modules may use every stage; ``sensitivity/commands/`` parses
arguments, calls one of them and prints. Imported lazily (nothing here is imported by ``sensitivity``).
"""
