"""``sensitivity export MODEL``: write a searched config as a real low-bit model.

```
sensitivity export digits-dit --weights shipped --multiquantizer multiquantizers/digits-dit.safetensors \
    --config quant_configs/digits-dit-w36.json --format packed --out exports/w36-packed
```
Formats: ``packed`` (ours, reloaded by ``sensitivity.load_quantized`` / ``sensitivity infer --quantized``),
``sdnq`` (``<DenoiserClass>.from_pretrained(DIR)`` with ``pip install sdnq``; ``--pipeline`` writes the
whole pipeline folder), ``onnx`` (onnxruntime; codes as UINT4 / uint8 initializers with
``DequantizeLinear`` or a codebook ``Gather``; ``--optimize``: onnxruntime's optimized graph). Everything is
checked before anything is written; OUT appears only when complete.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_model_arguments

    p = sub.add_parser("export", help="write a quantization config as a real low-bit model (packed, sdnq, onnx)",
                       description="Export MODEL's denoiser with a config's exact codes and tables: packed "
                       "(our safetensors format), sdnq (a diffusers folder for the SDNQ backend) or onnx.")
    add_model_arguments(p)
    p.add_argument("--multiquantizer", required=True, help="multiquantizer .safetensors file of MODEL")
    p.add_argument("--config", required=True, help="quantization config .json (layers absent from it stay unquantized)")
    p.add_argument("--format", required=True, choices=("packed", "sdnq", "onnx"), help="export format")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, see --overwrite)")
    p.add_argument("--float-dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="packed: dtype of the tensors that are not quantized (default: the model's)")
    p.add_argument("--pipeline", action="store_true",
                   help="sdnq: write the whole pipeline folder (other components untouched), not only the denoiser")
    p.add_argument("--opset", type=int, default=21, help="onnx: opset version (>= 21: blocked and int16 QDQ)")
    p.add_argument("--optimize", action="store_true", help="onnx: save onnxruntime's optimized graph (extended level)")
    p.add_argument("--metrics", default=None, help="JSON file {name: value} of held-out metrics for the model card")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import QuantConfig
    from ..errors import SensitivityError
    from ..export import check_format_arguments, export, require_extra
    from ..export.methods import check_exportable
    from ..io import check_new_folder
    from ..multiquantizer import load_multiquantizer
    from .arguments import model_from_args

    t0 = time.time()
    fam, weights, device, dtype = model_from_args(args)
    check_format_arguments(args.format, float_dtype=args.float_dtype, pipeline=args.pipeline or None,
                           opset=args.opset)
    require_extra(args.format)
    if args.format == "onnx":
        from ..export.onnx_format import check_opset

        check_opset(args.opset)
    if not Path(args.multiquantizer).is_file():
        raise SensitivityError(f"--multiquantizer {args.multiquantizer!r} does not exist")
    mq = load_multiquantizer(args.multiquantizer)
    model_id = fam.model_id(weights)
    if mq.model_id and mq.model_id != model_id:
        raise SensitivityError(f"multiquantizer {Path(args.multiquantizer).name} was built for {mq.model_id}, "
                               f"not for {model_id}")
    metrics = None
    if args.metrics:
        import json

        try:
            metrics = json.loads(Path(args.metrics).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SensitivityError(f"--metrics {args.metrics!r}: cannot read a JSON file ({exc})") from None
        if not isinstance(metrics, dict):
            raise SensitivityError(f"--metrics {args.metrics!r}: expected a JSON object {{name: value}}")
    config = QuantConfig.load(args.config)
    config.check_model(model_id, str(args.config))
    mq.validate(config.options)
    check_exportable(args.format, config.options, {s.name: (s.shape, s.kind) for s in mq.layers})
    out = check_new_folder(args.out, "--out", overwrite=args.overwrite)  # before the model is loaded
    pipe = fam.load_pipeline(weights, device="cpu", dtype=dtype, seed=args.seed)
    den = fam.denoiser(pipe)
    source = {"family": fam.name, "weights": weights, "seed": args.seed, "model_id": model_id,
              "config_path": str(args.config)}
    if mq.components:  # a pipeline multiquantizer: the whole pipeline folder, each quantized component in --format
        from ..export.pipeline import export_pipeline

        if args.format == "onnx":
            raise SensitivityError("a pipeline multiquantizer exports as a pipeline folder: --format packed or sdnq")
        record = export_pipeline(fam, pipe, mq, config, out, format=args.format, source=source,
                                 float_dtype=args.float_dtype, overwrite=args.overwrite, metrics=metrics,
                                 command="sensitivity " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
        print(f"wrote the {fam.name} pipeline to {out} ({args.format} components: "
              + ", ".join(f"{n} {c['quantized_layers']} layers at {c['avg_bits']:.3f} avg bits"
                          for n, c in record["components"].items())
              + f"; {record['bytes_on_disk'] / 2**20:.2f} MiB on disk) in {time.time() - t0:.1f} s")
        return 0
    example = None
    if args.format == "onnx":
        from ..export.onnx_format import example_inputs

        example = example_inputs(fam, pipe)
    record = export(den, mq, config, out, format=args.format, source=source, float_dtype=args.float_dtype,
                    pipeline=pipe if args.pipeline else None, overwrite=args.overwrite, opset=args.opset,
                    example_inputs=example, optimize=args.optimize, metrics=metrics,
                    command="sensitivity " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    size = record.get("bytes_on_disk", 0)
    print(f"wrote {args.format} export of {model_id} ({record['quantized_layers']}/{record['layers']} layers "
          f"quantized, {record['avg_bits']:.3f} avg bits) to {out}: {size / 2**20:.2f} MiB on disk "
          f"({size / max(record['quantized_bytes'], 1):.3f}x the config's quantized bytes, "
          f"{size / record['fp16_bytes']:.3f}x fp16) in {time.time() - t0:.1f} s")
    return 0
