"""The evaluation protocol of a job, from typed settings: ``protocol_for(model, multiquantizer, ...)``.

```python
from sensitivity.evaluation.protocol import protocol_for
fam, weights, factory, protocol, mq = protocol_for("digits-dit", "multiquantizers/digits-dit-shipped.safetensors",
                                                   images_per_class=2, steps=2)
evaluator = factory.build()                 # a worker's Evaluator (loads the model)
protocol.signature()                        # the cache signature of the protocol
```
Cheap: every file, number, metric dependency and the multiquantizer's model are checked *before* any
model is loaded; the errors are one line naming the option (by its command-line name) at fault.
``sensitivity sample`` and ``sensitivity evaluate`` build their arguments into this call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

from ..errors import SensitivityError

#: ``--dtype`` names -> torch dtype names
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ProtocolSetup(NamedTuple):
    """What :func:`protocol_for` returns (unpacks as a 5-tuple)."""

    family: Any          # the ModelFamily
    weights: str         # resolved weights
    factory: Any         # EvaluatorFactory: builds one worker's Evaluator
    protocol: Any        # EvalProtocol (its signature identifies a cache)
    multiquantizer: Any  # the loaded multiquantizer


def parse_class_ids(text: str) -> List[int]:
    """``'0-999'`` / ``'1,7,9'`` -> class ids."""
    import re

    ids: List[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        try:
            ids.extend(range(int(m.group(1)), int(m.group(2)) + 1) if m else [int(part)])
        except ValueError:
            raise SensitivityError(f"--class-ids {text!r}: expected ids like '0-999' or '1,7,9'") from None
    if not ids:
        raise SensitivityError(f"--class-ids {text!r}: no class id given")
    return ids


def read_prompts(path: str, n: Optional[int]) -> List[str]:
    """The first ``n`` captions of a COCO captions JSON, or the first ``n`` lines of a text file."""
    p = Path(path)
    if not p.is_file():
        raise SensitivityError(f"--prompts file {path!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    prompts: List[str]
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SensitivityError(f"--prompts {path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            prompts = [str(a.get("caption", "")).strip() for a in data["annotations"] if isinstance(a, dict)]
        elif isinstance(data, list) and all(isinstance(x, str) for x in data):
            prompts = [x.strip() for x in data]
        else:
            raise SensitivityError(f"--prompts {path}: expected COCO captions ({{'annotations': [{{'caption': ...}}]}}) "
                                   "or a list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [x for x in prompts if x]
    if not prompts:
        raise SensitivityError(f"--prompts {path}: holds no prompts")
    n = 1000 if n is None else n
    if n < 2:
        raise SensitivityError(f"--num-images must be at least 2, got {n}")
    if len(prompts) < n:
        raise SensitivityError(f"--prompts {path}: holds {len(prompts)} prompts, fewer than --num-images {n}")
    return prompts[:n]


def check_reference_dir(path: str) -> None:
    """A folder holding at least two real images."""
    from .metrics import IMAGE_EXTENSIONS

    p = Path(path)
    if not p.is_dir():
        raise SensitivityError(f"--reference-dir {path!r} is not a folder")
    n = 0
    for f in p.rglob("*"):
        if f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
            n += 1
            if n >= 2:
                return
    raise SensitivityError(f"--reference-dir {path!r} holds {n} images (.{', .'.join(IMAGE_EXTENSIONS)}); FID needs a folder of real images")


def check_protocol_numbers(*, steps: Optional[int] = None, guidance: Optional[float] = None, kid_subsets: int = 100,
                           num_images: Optional[int] = None, images_per_class: Optional[int] = None,
                           batch_size: Union[int, str, None] = None) -> Union[int, str, None]:
    """The protocol's numbers at the door (before any file is read or model loaded); returns the parsed
    batch size (``None``, ``"auto"`` or an int >= 1)."""
    from ..checks import check_values
    from .batching import parse_batch_size

    check_values(steps=steps, guidance=guidance, kid_subsets=kid_subsets, num_images=num_images,
                 images_per_class=images_per_class)
    return parse_batch_size(batch_size)


def compile_setting(value: Union[bool, str, None]) -> Union[bool, str]:
    """``compile`` -> ``False`` / ``True`` / a backend name (checked against torch's list)."""
    if not value:
        return False
    if value is True:
        return True
    import torch

    backends = torch._dynamo.list_backends(exclude_tags=()) if hasattr(torch, "_dynamo") else []
    if backends and value not in backends:
        raise SensitivityError(f"--compile {value}: not a torch.compile backend ({', '.join(sorted(backends))})")
    return str(value)


def check_metric_requirements(fam, *, reference_dir: Optional[str] = None, inception: Optional[str] = None,
                              clip_model: Optional[str] = None, lpips: Optional[str] = None,
                              act_bits: Optional[int] = None, act_calibration: Optional[str] = None,
                              paired_features: bool = False) -> Dict[str, Any]:
    """Check every metric's dependencies (packages, weight files) before any model is loaded or image made.

    Returns resolved paths and identities: ``inception`` (path or None), ``clip_id``, ``lpips_id``,
    ``act_calibration`` (path) and ``act_calibration_id``. Raises a one-line :class:`SensitivityError`.
    """
    from ..zoo.base import DIGITS_CLASSIFIER

    out: Dict[str, Any] = {"inception": None, "clip_id": "", "lpips_id": "", "act_calibration": None,
                           "act_calibration_id": None}
    digits = fam.feature_network == DIGITS_CLASSIFIER
    if inception and digits:
        raise SensitivityError(f"--inception: model {fam.name!r} scores FID with its shipped digits classifier")
    if (reference_dir or paired_features) and not digits:  # FID/KID or the paired feature metrics: Inception
        from . import metrics as M

        M.cleanfid_resizer()  # clean-fid itself (its "clean" resize)
        path = M.resolve_inception(inception)
        M.load_inception(path, "cpu")  # a loadable TorchScript file
        out["inception"] = str(path.resolve())
    elif inception:
        raise SensitivityError("--inception needs --reference-dir (the real images FID compares against) "
                               "or --paired-features")
    if clip_model:
        from .extra_metrics import check_clip

        if fam.conditioning != "text":
            raise SensitivityError(f"--clip-model: model {fam.name!r} is not text-conditional")
        out["clip_id"] = check_clip(clip_model)
    if lpips:
        from .extra_metrics import check_lpips

        out["lpips_id"] = check_lpips(lpips)
    if act_calibration:
        if act_bits is None:
            raise SensitivityError("--act-calibration needs --act-bits")
        if not Path(act_calibration).is_file():
            raise SensitivityError(f"--act-calibration {act_calibration!r} does not exist")
        from .evaluator import calibration_identity

        out["act_calibration"] = str(Path(act_calibration).resolve())
        out["act_calibration_id"] = calibration_identity(act_calibration)
    return out


def protocol_generation_overrides(fam, *, height: Optional[int] = None, width: Optional[int] = None,
                                  settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``height`` / ``width`` / ``extra`` of the protocol from the image size and other pipeline ``settings``
    (checked against the family; the caption cleaning really done is recorded in ``extra``)."""
    from ..captions import check_clean_caption, resolve_clean_caption
    from ..checks import check_values

    check_values(height=height, width=width)
    over: Dict[str, Any] = dict(settings or {})
    check_clean_caption(over)  # an explicit clean_caption=true without bs4/ftfy: refused here
    out: Dict[str, Any] = {"height": height, "width": width}
    over.update(resolve_clean_caption(over, fam.settings(None).extra, fam.name))  # what is really done, in the protocol
    fam.settings(None, **over)  # unknown settings: one-line error naming the known ones
    if over:
        out["extra"] = over
    return out


def protocol_for(model: str, multiquantizer: str, *, weights: Optional[str] = None,
                 pipeline_class: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None,
                 prompts: Optional[str] = None, class_ids: Union[str, Sequence[int], None] = None,
                 num_images: Optional[int] = None, images_per_class: Optional[int] = None, image_seed: int = 0,
                 reference_dir: Optional[str] = None, reference_cache: str = ".sensitivity-cache",
                 steps: Optional[int] = None, guidance: Optional[float] = None, scheduler: Optional[str] = None,
                 kid_subsets: int = 100, inception: Optional[str] = None, clip_model: Optional[str] = None,
                 lpips: Optional[str] = None, act_bits: Optional[int] = None, act_calibration: Optional[str] = None,
                 height: Optional[int] = None, width: Optional[int] = None,
                 settings: Optional[Mapping[str, Any]] = None, batch_size: Union[int, str, None] = None,
                 compile: Union[bool, str] = False, paired_features: bool = False) -> ProtocolSetup:
    """The protocol of ``model`` (family name, or ``diffusers`` with ``pipeline_class`` / a ``weights``
    folder) scored against ``multiquantizer`` (a .safetensors file built for that model).

    ``prompts``: COCO captions JSON or text file (text models; default 1000 prompts, or the family's
    shipped eval prompts, 500); ``class_ids``: ``'0-999'`` / ``'1,7,9'`` / ids (class models; default all),
    each ``images_per_class`` times (digits 50, others 1); image i from seed ``image_seed + i``;
    ``reference_dir``: real images for FID/KID (real models), features cached in ``reference_cache``;
    ``dtype``: ``fp32`` / ``fp16`` / ``bf16`` (default fp16 on cuda, fp32 on cpu); ``device`` default cuda
    if available; ``settings``: other pipeline settings; ``batch_size``: int, ``'auto'`` or None and
    ``compile`` (False / True / backend) change the speed, not the protocol; ``paired_features`` adds
    ``feature_mse`` / ``fd_fp`` / ``kid_fp`` (features against the full-precision images of the same seeds).
    """
    import torch

    from ..checks import check_device
    from ..multiquantizer import load_multiquantizer
    from ..zoo import get_family
    from ..zoo.base import DIGITS_CLASSIFIER
    from ..zoo.resolve import family_name_for
    from .evaluator import EvalProtocol, EvaluatorFactory

    batch_size = check_protocol_numbers(steps=steps, guidance=guidance, kid_subsets=kid_subsets,
                                        num_images=num_images, images_per_class=images_per_class,
                                        batch_size=batch_size)
    check_device(device)
    fam = get_family(family_name_for(model, pipeline_class, weights))
    weights = fam.resolve_weights(weights)
    conditions: Optional[List[Any]] = None
    if fam.conditioning == "class":
        if prompts:
            raise SensitivityError(f"model {fam.name!r} is class-conditional: use --class-ids, not --prompts")
        if num_images is not None:
            raise SensitivityError(f"model {fam.name!r} is class-conditional: use --images-per-class, not --num-images")
        per_class = images_per_class if images_per_class is not None else (50 if fam.feature_network == DIGITS_CLASSIFIER else 1)
        if per_class < 1:
            raise SensitivityError(f"--images-per-class must be >= 1, got {per_class}")
        if class_ids is None or class_ids == "":
            ids = list(range(int(fam.num_classes or 0)))
        else:
            ids = parse_class_ids(class_ids) if isinstance(class_ids, str) else [int(c) for c in class_ids]
        conditions = fam.check_conditions([c for c in ids for _ in range(per_class)])
    else:
        if class_ids:
            raise SensitivityError(f"model {fam.name!r} is text-conditional: use --prompts, not --class-ids")
        if images_per_class is not None:
            raise SensitivityError(f"model {fam.name!r} is text-conditional: use --num-images, not --images-per-class")
        source = prompts or getattr(fam, "eval_prompts", None)  # digits-sd ships its own
        if not source:
            raise SensitivityError(f"model {fam.name!r} needs --prompts (e.g. captions_val2017.json)")
        n = num_images if num_images is not None or prompts else 500
        conditions = fam.check_conditions(read_prompts(str(source), n))
    if reference_dir:
        check_reference_dir(reference_dir)
    elif fam.feature_network != DIGITS_CLASSIFIER:
        print(f"note: no --reference-dir: FID/KID are not computed for {fam.name}, only PSNR/MSE against full precision")
    metric = check_metric_requirements(fam, reference_dir=reference_dir, inception=inception, clip_model=clip_model,
                                       lpips=lpips, act_bits=act_bits, act_calibration=act_calibration,
                                       paired_features=paired_features)
    overrides = protocol_generation_overrides(fam, height=height, width=width, settings=settings)
    if not Path(multiquantizer).is_file():
        what = "is not a file" if Path(multiquantizer).exists() else "does not exist"
        raise SensitivityError(f"--multiquantizer {multiquantizer!r} {what}")
    mq = load_multiquantizer(multiquantizer)
    mq_family = str(mq.model_id).split(":", 1)[0]
    if mq_family != fam.name:
        raise SensitivityError(f"multiquantizer {Path(multiquantizer).name} was built for {mq.model_id}, "
                               f"not for model {fam.name!r}")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev_type = torch.device(dev).type
    except (RuntimeError, TypeError):
        raise SensitivityError(f"--device {dev!r} is not a torch device") from None
    torch_dtype = DTYPES.get(dtype or "", None)
    if torch_dtype is None:
        torch_dtype = "float16" if dev_type == "cuda" else "float32"
    ref_features = None
    if reference_dir and fam.feature_network != DIGITS_CLASSIFIER:  # computed once per job, cached by content
        from .metrics import CleanFIDInception, reference_folder_features

        ext = CleanFIDInception(device=dev if dev_type == "cuda" else "cpu", model=metric["inception"])
        ref_features = reference_folder_features(reference_dir, reference_cache, ext)
    protocol = EvalProtocol.for_family(
        fam, weights, conditions=conditions, seed=image_seed, steps=steps, guidance=guidance,
        scheduler=scheduler, dtype=torch_dtype, multiquantizer_hash=mq.hash,
        reference_dir=reference_dir, kid_subsets=kid_subsets, act_bits=act_bits,
        act_calibration=metric["act_calibration_id"], inception=metric["inception"],
        reference_features=ref_features, clip_model=metric["clip_id"], lpips_net=metric["lpips_id"],
        paired_features=paired_features, **overrides)
    factory = EvaluatorFactory(
        family=fam.name, multiquantizer=str(Path(multiquantizer).resolve()), protocol=protocol.to_dict(),
        weights=str(Path(weights).resolve()) if Path(weights).expanduser().is_dir() else weights,
        device=dev, dtype=torch_dtype, batch_size=batch_size,
        reference_dir=str(Path(reference_dir).resolve()) if reference_dir else None,
        cache_dir=str(Path(reference_cache).resolve()), inception=metric["inception"],
        clip_model=clip_model, lpips_net=lpips, act_calibration=metric["act_calibration"],
        compile=compile_setting(compile))
    return ProtocolSetup(fam, weights, factory, protocol, mq)
