"""The one registration idiom (sensitivity.registry) and the registries built on it."""

import pytest

from sensitivity.errors import SensitivityError
from sensitivity.registry import HandlerRegistry, Registry


def test_registry_get_names_decorator_alias_and_family():
    reg = Registry("widget")

    @reg.register("a")
    def a():
        return "a"

    reg.register("b", lambda: "b")
    reg.alias("first", "a")
    reg.add_family(r"w([0-9]+)", lambda m: int(m.group(1)), "w<N>", member="w3")
    assert reg.get("a") is a and reg.get("first") is a and reg.names() == ("a", "b")
    assert reg.get("w12") == 12 and "w12" in reg.names() and "w7" in reg and "zz" not in reg
    with pytest.raises(SensitivityError, match=r"^unknown widget 'c'; known: a, b, w12$"):
        reg.get("c")
    with pytest.raises(SensitivityError, match="already registered"):
        reg.register("a", object())
    with pytest.raises(SensitivityError, match="does not match"):
        reg.add_family(r"v([0-9]+)", int, "v<N>", member="x")


def test_registry_lazy_modules_are_imported_on_get_only():
    import sys

    reg = Registry("thing", lazy={"json_thing": "json"})
    assert reg.names() == ("json_thing",) and "json_thing" in reg
    with pytest.raises(SensitivityError, match="unknown thing 'json_thing'"):
        reg.get("json_thing")  # the module imported but registered nothing
    assert "json" in sys.modules


def test_handler_registry_walks_the_class_hierarchy():
    class Base:
        pass

    class Child(Base):
        pass

    class Other:
        pass

    reg = HandlerRegistry("frobnication")
    reg.register(Base, handler="h")
    reg.unsupported(Other, "others cannot")
    assert reg.lookup(Child()) == "h" and reg.lookup(Child) == "h" and reg.reason(Child) is None
    assert reg.lookup(Other()) is None and reg.reason(Other()) == "others cannot"
    with pytest.raises(SensitivityError, match="no frobnication: others cannot"):
        reg.get(Other())


def test_allocators_and_export_formats_are_registries():
    from sensitivity.allocators import ALLOCATORS, allocate
    from sensitivity.export.methods import EXPORT_FORMATS, check_exportable

    assert ALLOCATORS.names() == ("sdnq", "hawq", "mixdq", "reference")
    with pytest.raises(SensitivityError, match=r"^unknown allocator 'greedy' \(use sdnq, hawq, mixdq, reference\)$"):
        allocate("greedy", None, 3.0)
    assert EXPORT_FORMATS.names() == ("packed", "sdnq", "onnx")
    with pytest.raises(SensitivityError, match=r"^unknown export format 'gguf'; use one of packed, sdnq, onnx$"):
        check_exportable("gguf", {}, {})


def test_search_baseline_choices_come_from_the_allocator_registry():
    from sensitivity.allocators import ALLOCATORS
    from sensitivity.cli import build_parser

    parser = build_parser(only="search")
    sub = next(a for a in parser._actions if a.dest == "command")
    action = next(a for a in sub.choices["search"]._actions if a.dest == "baseline")
    assert tuple(action.choices) == ("uniform", "cache", "error-ilp") + ALLOCATORS.names()


def test_predictor_parameters_are_typed_and_unknown_names_rejected():
    pytest.importorskip("torch")
    from sensitivity.predictors import get_kind

    gnn = get_kind("gnn")
    with pytest.raises(SensitivityError, match=r"^predictor gnn: unknown parameter\(s\) epoch; known: batch_size, .*epochs"):
        gnn(None, {"epoch": 60})
    m = gnn(None, {"epochs": 60})
    assert m.hparams.epochs == 60 and m.params["epochs"] == 60 and m.params["layers"] == gnn.defaults["layers"] == 4
    with pytest.raises(Exception):  # frozen
        m.hparams.epochs = 1
    with pytest.raises(SensitivityError, match=r"^predictor gnn: unknown parameter\(s\) epoch;"):
        m.hparams.replace(owner="predictor gnn", epoch=3)
    with pytest.raises(SensitivityError, match=r"predictor additive: unknown parameter\(s\) alpha;"):
        get_kind("ensemble")(None, {"members": ["gnn", "additive"], "member_params": {"additive": {"alpha": 1.0}}})
