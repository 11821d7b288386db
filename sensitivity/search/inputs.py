"""The search's inputs from files: a (layer, option, score) table, the multiquantizer a predictor was trained with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

from ..errors import SensitivityError


def load_scores_csv(path: Union[str, os.PathLike]):
    """A scores CSV with columns ``layer, option, score`` (higher = better) as a DataFrame."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise SensitivityError(f"scores file {str(path)!r} does not exist")
    try:
        df = pd.read_csv(p)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise SensitivityError(f"{path}: cannot read CSV ({type(exc).__name__})") from None
    missing = {"layer", "option", "score"} - set(df.columns)
    if missing:
        raise SensitivityError(f"{path}: missing columns {sorted(missing)} (needs layer, option, score)")
    return df


def multiquantizer_for(path: Optional[Union[str, os.PathLike]] = None, predictor: Any = None) -> Tuple[Any, str]:
    """``(multiquantizer, path)``: ``path``, else the one ``predictor`` was trained with
    (``multiquantizer_path``); refused when its hash differs from the predictor's."""
    from ..multiquantizer import load_multiquantizer

    if path is None and predictor is not None:
        path = getattr(predictor, "multiquantizer_path", None)
        if path is not None and not Path(path).is_file():
            raise SensitivityError(f"the predictor's multiquantizer {str(path)!r} is missing; pass --multiquantizer")
    if path is None:
        raise SensitivityError("no multiquantizer: pass --multiquantizer FILE")
    mq = load_multiquantizer(path)
    want = getattr(predictor, "multiquantizer_hash", None)
    if want and want != mq.hash:
        raise SensitivityError(f"{path}: multiquantizer hash {mq.hash[:12]} differs from the predictor's {str(want)[:12]} "
                               "(scores would refer to other quantized weights)")
    return mq, str(path)


def bits_range(sizes: Any) -> Tuple[float, float]:
    """Average bits with every layer at its smallest and at its largest option of ``sizes``."""
    from ..sizes import SizeTable

    table = SizeTable.of(sizes)
    return table.min_avg_bits(), table.max_avg_bits()
