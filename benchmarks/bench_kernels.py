"""CPU matmul kernels for the packed run-time modules: float32 GEMM vs torch's int8 / int4 kernels.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json

Shapes ``(tokens, in, out)`` of SD1.5's linear layers at 64x64 latents (self-attention projections and
feed-forward of each resolution, cross-attention K/V on 77 text tokens) and of digits-dit. Rows:
``fp32`` (``F.linear``), ``on_the_fly`` (fused 4-bit dequantize into a reused buffer + ``F.linear``),
``w8a8_float`` (W8A8 on float kernels: ``F.linear`` of the fake-quantized input, as ``apply()`` computes it),
``int8_dynamic`` (the W8A8 module path: fused per-token activation quantization, ``torch._int_mm``, fused
dequantize epilogue), ``int_mm_only`` (the integer matmul alone), ``weight_int8pack_bf16``
(``torch._weight_int8pack_mm``), ``weight_int4pack_bf16`` (``torch._weight_int4pack_mm_for_cpu``, group 32;
``--weight-only-fp32`` adds both on float32 inputs: 15-30x fp32 here). The cases run interleaved (each
repeat times every case once, so load on a shared machine falls on all of them alike); median of
``--repeats`` after a warm-up; ratios to ``fp32`` of the same shape, same run.

Conv shapes ``(in, out, size, kernel)`` of SD1.5's UNet at 64x64 latents, batch 1: ``fp32`` (``F.conv2d``),
``on_the_fly`` (fused 4-bit dequantize + ``F.conv2d``), ``w8a8_float`` (``F.conv2d`` of the input
fake-quantized per (sample, channel), as ``apply()`` computes it) and ``int8_conv`` (the W8A8 module path:
the input's per-sample uint8 codes in one pass, oneDNN's int8 convolution, fp32 output).

Both tables: ``blocks_<N>`` is the on-the-fly module's output-channel blocks (a packed ``uaq-4`` module's
``_tiled_forward``: ``N`` output rows dequantized into the scratch buffer, then their matmul / conv), where
``on_the_fly`` dequantizes the whole weight first (:mod:`sensitivity.export.runtime`, ``tile_rows``); empty
where ``N`` is not below the layer's output rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(4096, 320, 320), (1024, 640, 640), (256, 1280, 1280), (64, 1280, 1280), (4096, 320, 2560),
          (4096, 1280, 320), (1024, 640, 5120), (64, 1280, 5120), (77, 768, 320), (77, 768, 1280), (64, 128, 128)]
CONV_SHAPES = [(4, 320, 64, 3), (320, 320, 64, 3), (640, 640, 32, 3), (1280, 1280, 16, 3), (1280, 1280, 8, 3),
               (2560, 1280, 8, 3), (320, 640, 32, 1)]
#: rows per block of the on-the-fly kernel's output-channel blocks (``blocks_<N>`` columns)
BLOCKS = (64, 256)


def _packed_uaq4(module):
    """``module`` as a packed ``uaq-4`` on-the-fly module (the run-time module ``load_quantized`` builds)."""
    import torch

    from sensitivity.export.modules import PartSpec, pack_module
    from sensitivity.quantizers.packing import pack_codes
    from sensitivity.quantizers.tensor import quantize

    qw = quantize(module.weight.detach().contiguous(), "uaq-4")
    codes = torch.from_numpy(pack_codes(qw.codes.reshape(-1).numpy(), qw.bits))
    part = PartSpec("w", tuple(module.weight.shape), None, "uaq-4", tuple(sorted(qw.params)))
    return pack_module(module, [part], [{"codes": codes, **qw.params}], torch.float32, runtime="on_the_fly")


def block_cases(module, w, x) -> dict:
    """``{blocks_<N>: call}``: ``module`` given the weight ``w``, packed as ``uaq-4``, run on ``x`` in blocks of
    ``N`` output rows (every ``N`` of :data:`BLOCKS` below its rows)."""
    import torch

    with torch.no_grad():
        module.weight.copy_(w)
    q = _packed_uaq4(module)
    return {f"blocks_{b}": (lambda b=b: q._tiled_forward(x, b)) for b in BLOCKS if q.tile_rows_allowed(b)}


def bench(cases, repeats: int) -> dict:
    """Median seconds of each case, the cases interleaved within every repeat (after one warm-up call each)."""
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weight-only-fp32", action="store_true", help="also torch's weight-only kernels on fp32 inputs")
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from sensitivity.export.kernels import dequantize_into, pad_packed
    from sensitivity.export.runtime import Int8Conv, Int8Weight, int8_linear
    from sensitivity.quantizers.activation import quantize_channels, quantize_tokens
    from sensitivity.quantizers.packing import pack_codes

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for t, k, n in SHAPES:
        x = torch.randn(t, k, generator=gen)
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
        d, z = torch.rand(n, generator=gen) * 0.01, torch.full((n,), 8.0)
        w = (codes.float() - z[:, None]) * d[:, None]
        padded = pad_packed(torch.from_numpy(pack_codes(codes.reshape(-1).numpy(), 4)))
        table = (torch.arange(16.0)[None, :] - z[:, None]) * d[:, None]
        buf = torch.empty(n, k)
        i8 = Int8Weight(codes, d, z).tensors()
        wq = i8["wq"]
        xq = torch.randint(-127, 127, (t, k), dtype=torch.int8, generator=gen)
        w4 = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        sz = torch.stack([torch.full((k // 32, n), 0.01), torch.zeros(k // 32, n)], -1)
        xb = x.bfloat16()
        cases = {
            "fp32": lambda: F.linear(x, w),
            "on_the_fly": lambda: F.linear(x, dequantize_into(padded, 4, table, n, k, k, buf)),
            "w8a8_float": lambda: F.linear(quantize_tokens(x, 8), w),
            "int8_dynamic": lambda: int8_linear(x, i8, None),
            "int_mm_only": lambda: torch._int_mm(xq, wq.t()) if t > 16 else None,
            "weight_int8pack_bf16": lambda: torch._weight_int8pack_mm(xb, wq, d.bfloat16()),
            "weight_int4pack_bf16": lambda: torch._weight_int4pack_mm_for_cpu(xb, w4, 32, sz.bfloat16()),
        }
        cases.update(block_cases(torch.nn.Linear(k, n, bias=False), w, x))
        if args.weight_only_fp32:
            cases["weight_int8pack_fp32"] = lambda: torch._weight_int8pack_mm(x, wq, d)
            cases["weight_int4pack_fp32"] = lambda: torch._weight_int4pack_mm_for_cpu(x, w4, 32, sz)
        with torch.no_grad():
            res = bench(cases, args.repeats)
        rows.append({"shape": [t, k, n], "seconds": res})
        print(json.dumps(rows[-1]), file=sys.stderr)
    conv_rows = []
    for cin, cout, hw, ks in CONV_SHAPES:
        x = torch.randn(1, cin, hw, hw, generator=gen)
        kk = cin * ks * ks
        codes = torch.randint(0, 16, (cout, kk), dtype=torch.uint8, generator=gen)
        d, z = torch.rand(cout, generator=gen) * 0.01, torch.full((cout,), 8.0)
        w = ((codes.float() - z[:, None]) * d[:, None]).view(cout, cin, ks, ks)
        padded = pad_packed(torch.from_numpy(pack_codes(codes.reshape(-1).numpy(), 4)))
        table = (torch.arange(16.0)[None, :] - z[:, None]) * d[:, None]
        buf = torch.empty(cout, kk)
        module = torch.nn.Conv2d(cin, cout, ks, padding=ks // 2, bias=False)
        conv = Int8Conv.from_codes(codes, d, z, module)
        pad = ks // 2
        cases = {
            "fp32": lambda: F.conv2d(x, w, None, 1, pad),
            "on_the_fly": lambda: F.conv2d(x, dequantize_into(padded, 4, table, cout, kk, kk, buf).view(w.shape),
                                           None, 1, pad),
            "w8a8_float": lambda: F.conv2d(quantize_channels(x, 8), w, None, 1, pad),
            "int8_conv": lambda: conv(x, None, lambda: w),
        }
        cases.update(block_cases(module, w, x))
        with torch.no_grad():
            res = bench(cases, args.repeats)
        conv_rows.append({"conv": [cin, cout, hw, ks], "seconds": res})
        print(json.dumps(conv_rows[-1]), file=sys.stderr)
    calib = float(subprocess.run([sys.executable, "-c", "import time;t=time.perf_counter();sum(range(10**7));"
                                  "print(time.perf_counter()-t)"], capture_output=True, text=True).stdout)
    from sensitivity.io import atomic_write_text

    out = {"rows": rows, "conv_rows": conv_rows, "threads": args.threads, "repeats": args.repeats, "calibrator_s": calib,
           "loadavg": list(os.getloadavg()), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "command": "python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(kernel_table(out))


def _columns(rows) -> list:
    """Case names over all rows, in first-seen order (``blocks_<N>`` exists only where ``N`` < the rows)."""
    names: list = []
    for r in rows:
        names += [n for n in r["seconds"] if n not in names]
    return names


def kernel_table(result: dict) -> str:
    names = _columns(result["rows"])
    lines = [f"torch {result['torch']} ({result['cpu_capability']}), {result['threads']} threads, median of "
             f"{result['repeats']}; calibrator {result['calibrator_s']:.2f} s, load average "
             f"{' / '.join(f'{x:.1f}' for x in result['loadavg'])}. Time as a ratio to fp32 `F.linear` of the shape.",
             "", "| tokens x in x out | fp32 ms | " + " | ".join(names[1:]) + " |",
             "|---|---:|" + "---:|" * (len(names) - 1)]
    for r in result["rows"]:
        s = r["seconds"]
        lines.append(f"| {' x '.join(map(str, r['shape']))} | {1e3 * s['fp32']:.2f} | "
                     + " | ".join(f"{s[n] / s['fp32']:.2f}" if s.get(n) is not None else "" for n in names[1:]) + " |")
    if result.get("conv_rows"):
        names = _columns(result["conv_rows"])
        lines += ["", "Conv layers (batch 1), time as a ratio to fp32 `F.conv2d` of the shape:", "",
                  "| in -> out, size, kernel | fp32 ms | " + " | ".join(names[1:]) + " |",
                  "|---|---:|" + "---:|" * (len(names) - 1)]
        for r in result["conv_rows"]:
            cin, cout, hw, ks = r["conv"]
            s = r["seconds"]
            lines.append(f"| {cin} -> {cout}, {hw} x {hw}, {ks} x {ks} | {1e3 * s['fp32']:.2f} | "
                         + " | ".join(f"{s[n] / s['fp32']:.2f}" if s.get(n) is not None else "" for n in names[1:]) + " |")
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
