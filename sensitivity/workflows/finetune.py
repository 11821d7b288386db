"""Quantization-aware fine-tuning of a config as one call: ``finetune_config(model, multiquantizer, out, config=...)``.

```python
from sensitivity.workflows.finetune import finetune_config
run = finetune_config("digits-dit", "mq.safetensors", "finetuned/dit-3.4", config="w34.json", weights="shipped",
                      steps=300, lr=1e-4)
run.record["val_loss_after"], run.record["avg_bits_after"]      # also finetuned/dit-3.4/finetune.json
```
Distillation from the full-precision teacher (:func:`sensitivity.finetune.finetune`) on the digits data
(digits models), an imagefolder ``data`` or the teacher's own samples of ``prompts``. Rerun the same call
after a kill to resume. Every input is checked before the model loads or anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Union

from ..errors import SensitivityError

PathLike = Union[str, os.PathLike]


class FinetuneResult(NamedTuple):
    """The run's record (``finetune.json``; ``already_done`` when ``out`` was finished with these settings),
    the family and the output folder."""

    record: Dict[str, Any]
    family: Any
    out: Path


def finetune_config(model: str, multiquantizer: PathLike, out: PathLike, *, config: Optional[PathLike] = None,
                    calibrated: Optional[PathLike] = None, weights: Optional[str] = None,
                    device: Optional[str] = None, data: Optional[PathLike] = None, prompts: Optional[PathLike] = None,
                    sample_steps: Optional[int] = None, guidance: Optional[float] = None, amp: Optional[str] = None,
                    restart: bool = False, progress: bool = True, **settings: Any) -> FinetuneResult:
    """Fine-tune ``config`` (or the config of the calibrated artifact ``calibrated``, whose codes are then the
    start) of ``multiquantizer`` on ``model`` and write the artifact to ``out``.

    Data: the digits data (digits models), ``data`` (imagefolder with ``metadata.jsonl`` captions) or
    ``prompts`` (a text file: the teacher's samples, ``sample_steps`` / ``guidance``). ``amp``: bf16 / fp16 /
    off (default: bf16 on cuda, off on cpu). ``settings``: the fields of
    :class:`sensitivity.finetune.FinetuneSettings` (``steps``, ``lr``, ``batch_size``, ``seed``...; unknown
    names are refused); ``seed`` also seeds ``random`` / ``tiny`` weights. ``restart``: discard a checkpoint.
    """
    import torch

    from ..checks import check_values
    from ..config import QuantConfig
    from ..finetune import DigitsData, FinetuneSettings, ImageFolderData, TeacherSamplesData, finetune
    from ..finetune.data import DIGITS_FAMILIES, read_imagefolder
    from ..io import check_writable
    from ..multiquantizer import load_family_multiquantizer
    from ..zoo import get_family
    from ..zoo.digits_sd import read_prompt_file

    t0 = time.time()
    known = [f.name for f in dataclasses.fields(FinetuneSettings)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise SensitivityError(f"unknown fine-tuning setting {unknown[0]!r}; known: {', '.join(known)}")
    check_values(sample_steps=sample_steps, guidance=guidance)
    fam = get_family(model)
    weights = fam.resolve_weights(weights)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SensitivityError(f"--device {device!r} is not a torch device") from None
    amp = amp if amp is not None else ("bf16" if dev.type == "cuda" else "off")
    st = FinetuneSettings(amp=None if amp == "off" else amp, **settings)
    seed = st.seed

    # every file is checked before the model is loaded or anything is written
    check_writable(out, "--out", directory=True)
    if data:
        read_imagefolder(data)
    prompt_list = read_prompt_file(prompts, what="--prompts") if prompts else None
    mq = load_family_multiquantizer(multiquantizer, fam.name)
    art = _load_calibrated(calibrated, mq) if calibrated else None
    if config:
        cfg = QuantConfig.load(config)
        source = config
    elif art is not None:
        cfg, source = art.config, calibrated
    else:
        raise SensitivityError("give --config X.json (or --calibrated DIR)")
    cfg.check_model(mq.model_id or fam.model_id(weights), str(source))
    try:
        mq.validate(cfg.options)
    except SensitivityError as exc:
        raise SensitivityError(f"{source}: {exc}") from None
    if art is not None and dict(art.config.options) != dict(cfg.options):
        raise SensitivityError(f"--calibrated {calibrated}: its config differs from {config}")
    digits = fam.name in DIGITS_FAMILIES
    if not digits and not (data or prompt_list):
        raise SensitivityError(f"model {fam.name!r}: give --data DIR (imagefolder) or --prompts FILE")
    if digits and (data or prompt_list):
        raise SensitivityError(f"model {fam.name!r} trains on the digits data; --data / --prompts are for "
                               "text-to-image models")

    dtype = torch.float32  # fp32 master weights; amp autocasts the forward passes
    pipe = fam.load_pipeline(weights, device=device, dtype=dtype, seed=seed)
    den = fam.denoiser(pipe)
    mq.check_model(den)
    if digits:
        source_data = DigitsData(fam.name, st.batch_size)
    elif data:
        source_data = ImageFolderData.from_folder(fam, pipe, data, st.batch_size, seed=seed)
    else:
        overrides = {k: v for k, v in (("steps", sample_steps), ("guidance", guidance)) if v is not None}
        source_data = TeacherSamplesData.from_prompts(fam, pipe, prompt_list, st.batch_size, seed=seed, **overrides)
    start = None
    if art is not None:
        opts = {k: v for k, v in cfg.options.items() if v != "fp16"}
        start = {n: art.quantized_weight(n, mq) for n in opts}
    t_load = time.time() - t0
    record = finetune(den, mq, cfg, source_data, out, st, model_id=fam.model_id(weights), start=start,
                      device=dev, progress=progress, restart=restart,
                      extra={"weights": weights, "config_path": str(source),
                             "calibrated": str(calibrated) if calibrated else None,
                             "load_seconds": round(t_load, 2)})
    return FinetuneResult(record, fam, Path(out))


def _load_calibrated(path: PathLike, mq: Any) -> Any:
    """A calibrated artifact (``sensitivity calibrate``), checked against ``mq``."""
    from ..calibration import load_calibrated

    art = load_calibrated(path)
    if getattr(art, "multiquantizer_hash", mq.hash) != mq.hash:
        raise SensitivityError(f"--calibrated {path} was made with multiquantizer {art.multiquantizer_hash[:12]}, "
                               f"not {mq.hash[:12]}")
    return art
