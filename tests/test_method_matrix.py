"""Every registered quantization method x every per-method feature: handled, or declared unsupported
with a reason. The matrix is built from the registries (sensitivity.registry), so a new method or a new
feature is checked without editing this file."""

import pytest

pytest.importorskip("torch")

from sensitivity.calibration.pipeline import DEFAULT_ROUNDING  # noqa: E402
from sensitivity.calibration.rounding import TABLE_REFITS  # noqa: E402
from sensitivity.evaluation.bops import weight_bits  # noqa: E402
from sensitivity.export.methods import EXPORT_MAPPINGS  # noqa: E402
from sensitivity.finetune.rules import FINETUNE_RULES  # noqa: E402
from sensitivity.quantizers import get_method  # noqa: E402
from sensitivity.quantizers.base import METHODS, family_members, method_names  # noqa: E402
from sensitivity.warmup import warm_options  # noqa: E402

#: feature -> its HandlerRegistry (keyed by the method's class)
FEATURES = {
    "finetune": FINETUNE_RULES,
    "export onnx/sdnq": EXPORT_MAPPINGS,
    "calibration rounding": DEFAULT_ROUNDING,
    "calibration refit": TABLE_REFITS,
}


def sample_option(m):
    return m.option_name(m.fixed_bits if m.fixed_bits is not None else 4)


def matrix():
    """``{method: {feature: "ok" | "unsupported: why" | "GAP"}}`` over every registered method and family."""
    out = {}
    for name in dict.fromkeys(list(method_names()) + list(family_members())):
        m = get_method(name)
        row = {}
        for feature, reg in FEATURES.items():
            if reg.lookup(m) is not None:
                row[feature] = "ok"
            else:
                why = reg.reason(m)
                row[feature] = f"unsupported: {why}" if why else "GAP"
        fmt = EXPORT_MAPPINGS.lookup(m)
        if fmt is not None:
            f = fmt(m)
            row["export sdnq"] = "ok" if f.sdnq else (f"unsupported: {f.sdnq_reason}" if f.sdnq_reason else "GAP")
        else:
            row["export sdnq"] = row["export onnx/sdnq"]
        bits = weight_bits(sample_option(m))
        row["bops"] = "ok" if isinstance(bits, int) and 1 <= bits <= 16 else "GAP"
        row["warmup"] = "ok" if sample_option(m) in warm_options() else "GAP"
        out[name] = row
    return out


def gaps(mx):
    return [f"{method} x {feature}" for method, row in mx.items() for feature, v in row.items() if v == "GAP"]


def test_every_method_has_every_feature_or_a_reason():
    mx = matrix()
    assert set(mx) >= {"uaq", "uaq_ls", "uaq_g128", "kmeans_c", "kmeans_a", "int8", "int8_c", "fp8_e4m3"}
    assert gaps(mx) == [], "\n".join(f"{m}: {row}" for m, row in mx.items())
    # the declared gaps are the known ones, each with its reason
    assert mx["uaq_g128"]["calibration rounding"].startswith("unsupported: not a single-table method")
    assert mx["fp8_e4m3"]["calibration refit"].startswith("unsupported: ")
    assert all(v == "ok" for v in mx["uaq"].values())


def test_uaq_g_is_parsed_once_and_known_by_type():
    """The group size comes from the method's config, in every feature."""
    m = get_method("uaq_g64")
    assert m.config.group_size == 64
    assert EXPORT_MAPPINGS.lookup(m)(m).group == 64
    from sensitivity.finetune.rules import rule_for

    assert rule_for("uaq_g64-3").group == 64


def test_a_new_method_without_handlers_is_a_gap(monkeypatch):
    from test_methods import SignTimesMean as Sign  # a toy 1-bit table method defined outside the package

    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    METHODS.register("sign1", Sign("sign1"))
    g = gaps(matrix())
    assert "sign1 x finetune" in g and "sign1 x export onnx/sdnq" in g and "sign1 x calibration refit" in g
    assert "sign1 x calibration rounding" not in g  # every table method gets GPTQ
    assert "sign1 x warmup" not in g  # the warm-up list comes from the registry
    FINETUNE_RULES.unsupported(Sign, "a 1-bit sign has nothing to fine-tune")
    try:
        assert "sign1 x finetune" not in gaps(matrix())
    finally:
        FINETUNE_RULES._unsupported.pop(Sign)
