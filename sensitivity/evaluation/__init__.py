"""Evaluation: metrics, the evaluator, the config sampler, the SQLite cache and the job runners.

Submodules are imported on use (``from sensitivity.evaluation.cache import ConfigCache``), so that
importing this package stays cheap.
"""
