"""One config evaluated with a job's protocol: ``evaluate_config(model, multiquantizer, config=...)``.

The record is the one a ``sample`` job would store (avg bits, bytes, summed error, metrics, timings),
so it is comparable with a cache's; with ``cache`` it is looked up there first (same signature) and
stored there after evaluation. ``config`` may be a calibrated folder; ``finetuned`` a fine-tuned
artifact made from ``multiquantizer`` (its weights, and its config unless ``config`` is given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Union

from ..errors import SensitivityError


class EvaluateResult(NamedTuple):
    """What :func:`evaluate_config` returns: the record (``from_cache`` set when it was looked up), the
    family, the protocol, the (fine-tuned) multiquantizer, the config's source path and its hash."""

    record: Dict[str, Any]
    family: Any
    protocol: Any
    multiquantizer: Any
    source: str
    config_hash: str


def evaluate_config(model: str, multiquantizer: str, *, config: Optional[str] = None,
                    finetuned: Optional[str] = None, trust_pickle: bool = False,
                    cache: Union[str, Path, None] = None, force: bool = False, **settings: Any) -> EvaluateResult:
    """Evaluate ``config`` (a config .json, a reference .pkl with ``trust_pickle``, or a calibrated folder)
    or the fine-tuned artifact ``finetuned`` with the protocol of :func:`sensitivity.evaluation.protocol.protocol_for`
    (``settings``: its keyword arguments); ``cache``: look up / store the record there (``force``: evaluate anyway)."""
    from ..config import QuantConfig
    from ..evaluation.cache import ConfigCache, build_record, config_hash, normalize_config
    from ..evaluation.protocol import protocol_for
    from ..evaluation.runners import layer_stats_from_multiquantizer
    from ..sizes import SizeTable

    cache_path = cache  # `store`: the open ConfigCache

    if cache_path and not Path(cache_path).exists():
        from ..io import check_writable

        check_writable(cache_path, "--cache")
    if not config and not finetuned:
        raise SensitivityError("give --config X.json (or --finetuned DIR)")
    ft = calibrated = None
    source = config or finetuned
    if finetuned:
        from ..finetune import load_finetuned

        ft = load_finetuned(finetuned)
        cfg = QuantConfig.load(config, trust_pickle=trust_pickle) if config else ft.config
    else:
        from ..calibration.artifact import load_config_or_calibrated

        cfg, calibrated = load_config_or_calibrated(config, trust_pickle=trust_pickle)
    if cfg.act_bits is not None and calibrated is None:  # a searched W·A config: its protocol's activations
        if settings.get("act_bits") is not None and settings["act_bits"] != cfg.act_bits:
            raise SensitivityError(f"{config}: chosen for A{cfg.act_bits}, but --act-bits {settings['act_bits']}")
        settings["act_bits"] = cfg.act_bits
    fam, weights, factory, protocol, mq = protocol_for(model, multiquantizer, **settings)
    if ft is not None:
        if ft.base_multiquantizer_hash != mq.hash:
            raise SensitivityError(f"--finetuned {finetuned} was made from multiquantizer "
                                   f"{ft.base_multiquantizer_hash[:12]}, not {Path(multiquantizer).name}")
        mq, protocol = ft, protocol.with_multiquantizer(ft.hash)  # its own signature: not mixed with the base's
    if calibrated is not None and cache_path:
        raise SensitivityError(f"{config}: a calibrated config is not stored in caches (its config hash is the "
                               "uncalibrated one's); drop --cache")
    try:
        mq.validate(cfg.options)
    except SensitivityError as exc:
        raise SensitivityError(f"{source}: {exc}") from None
    options = normalize_config(cfg.options)
    stats = ft.layer_stats() if ft is not None else layer_stats_from_multiquantizer(mq)
    sizes = SizeTable.from_layer_stats(stats)
    signature, evaluation = protocol.signature(), protocol.to_dict()
    chash = config_hash(options)
    record = None
    store = None
    if cache_path:
        if Path(cache_path).exists():
            store = ConfigCache(cache_path)
            try:
                store.check_signature(signature, evaluation)
            except BaseException:
                store.close()  # closed, SQLite leaves no -wal / -shm files beside it
                raise
            rid = store.lookup(chash) if store.signature else None
            if rid is not None and not force:
                record = next(r for r in store.records() if r["id"] == rid)
                record["from_cache"] = True
    if record is None:
        if ft is None:
            if cache_path:  # the full-precision images of the cache's jobs (shared with `sample` on it)
                from dataclasses import replace

                from ..evaluation.fp_reference import job_fp_images_dir

                factory = replace(factory, fp_images_dir=str(job_fp_images_dir(cache_path)))
            ev = factory.build()  # loads the model; checks the multiquantizer against it
        else:
            from ..evaluation.evaluator import Evaluator

            pipe = fam.load_pipeline(factory.weights, device=factory.device, dtype=factory.dtype)
            ev = Evaluator(fam, pipe, ft, protocol, batch_size=factory.batch_size,
                           reference_dir=factory.reference_dir, cache_dir=factory.cache_dir)
        metrics = dict(ev.evaluate(calibrated if calibrated is not None else options))
        timings = dict(metrics.pop("timings", None) or {})
        if "seconds" in metrics:
            timings["evaluate"] = metrics.pop("seconds")
        record = build_record(options, sizes, metrics, timings, signature=signature)
        if calibrated is not None:
            record["calibration"] = {"path": str(config), "calibration_hash": calibrated.calibration_hash,
                                     "weights_method": calibrated.manifest.get("weights_method"),
                                     "activations": (calibrated.manifest.get("activations") or {}).get("bits")}
        if cache_path:
            store = store or ConfigCache(cache_path, create=True)
            store.ensure_signature(signature, evaluation)
            store.set_layer_stats(stats)
            store.add(record)
    if store is not None:
        store.close()
    return EvaluateResult(record, fam, protocol, mq, str(source), chash)
