"""Compile (or load from cache) every numba kernel once, on tiny inputs: ``python -m sensitivity.warmup``.

``scripts/install.sh`` runs it, so the first ``multiquantize`` / ``demo`` / test does not pay the
compilation. The kernels are cached per machine (:mod:`sensitivity.numba_cache`), so a second checkout
of the same sources loads them in well under a second. Only public entry points are called, with the
argument types real runs use (float32 rows, uint8 codes), so exactly the signatures that matter get compiled.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, Tuple


def warm_options() -> Tuple[str, ...]:
    """One option per registered method and method family (its only width, else 4 bits)."""
    from .quantizers import get_method
    from .quantizers.base import family_members, method_names

    out = []
    for name in dict.fromkeys(list(method_names()) + list(family_members())):
        m = get_method(name)
        out.append(m.option_name(m.fixed_bits if m.fixed_bits is not None else 4))
    return tuple(out)


def warm_kernels() -> Dict[str, float]:
    """Run every quantization option, code packing and the dequantizing gather once; seconds per step."""
    import numpy as np
    import torch

    from .options import OPTION_NAMES
    from .quantizers import quantize
    from .quantizers.packing import gather_rows, pack_codes, unpack_codes

    seconds: Dict[str, float] = {}
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    for opt in dict.fromkeys(list(OPTION_NAMES) + list(warm_options())):
        t = time.perf_counter()
        quantize(w, opt).dequantize()
        seconds[opt] = time.perf_counter() - t
    t = time.perf_counter()
    for bits in (3, 4, 8):
        codes = (np.arange(64) % (1 << bits)).astype(np.uint8)
        unpack_codes(pack_codes(codes, bits), bits, codes.size)
    codes = np.zeros((2, 8), np.uint8)
    for table in (np.zeros((1, 16), np.float32), np.zeros((2, 16), np.float32)):
        gather_rows(table, codes, np.empty((2, 8), np.float32))
    seconds["packing"] = time.perf_counter() - t
    return seconds


def main(argv=None) -> int:
    import os

    from .numba_cache import cache_dir

    p = argparse.ArgumentParser(prog="python -m sensitivity.warmup", description=__doc__.splitlines()[0])
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    args = p.parse_args(argv)
    t = time.perf_counter()
    seconds = warm_kernels()
    total = time.perf_counter() - t
    if not args.quiet:
        for name, s in seconds.items():
            print(f"  {name:<12} {s:6.2f} s")
    print(f"numba kernels ready in {total:.1f} s (cache: {os.environ.get('NUMBA_CACHE_DIR') or cache_dir()})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
