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


def register(sub: argparse._SubParsersAction) -> None:
    from .arguments import add_model_arguments, add_multiquantizer_argument

    p = sub.add_parser("export", help="write a quantization config as a real low-bit model (packed, sdnq, onnx)",
                       description="Export MODEL's denoiser with a config's exact codes and tables: packed "
                       "(our safetensors format), sdnq (a diffusers folder for the SDNQ backend) or onnx.")
    add_model_arguments(p)
    add_multiquantizer_argument(p)
    p.add_argument("--config", required=True, help="quantization config .json (layers absent from it stay unquantized)")
    from ..export.methods import FORMATS  # the registry's names; no torch import

    p.add_argument("--format", required=True, choices=FORMATS, help="export format")
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
    from ..workflows.export import export_model

    res = export_model(args.model, args.multiquantizer, args.config, args.out, format=args.format,
                       weights=args.weights, pipeline_class=args.pipeline_class, device=args.device, dtype=args.dtype,
                       seed=args.seed, float_dtype=args.float_dtype, pipeline=args.pipeline, opset=args.opset,
                       optimize=args.optimize, metrics=args.metrics, overwrite=args.overwrite,
                       command="sensitivity " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    record, out = res.record, res.out
    if res.pipeline:
        print(f"wrote the {res.family.name} pipeline to {out} ({args.format} components: "
              + ", ".join(f"{n} {c['quantized_layers']} layers at {c['avg_bits']:.3f} avg bits"
                          for n, c in record["components"].items())
              + f"; {record['bytes_on_disk'] / 2**20:.2f} MiB on disk) in {res.seconds:.1f} s")
        return 0
    size = record.get("bytes_on_disk", 0)
    print(f"wrote {args.format} export of {res.model_id} ({record['quantized_layers']}/{record['layers']} layers "
          f"quantized, {record['avg_bits']:.3f} avg bits) to {out}: {size / 2**20:.2f} MiB on disk "
          f"({size / max(record['quantized_bytes'], 1):.3f}x the config's quantized bytes, "
          f"{size / record['fp16_bytes']:.3f}x fp16) in {res.seconds:.1f} s")
    return 0
