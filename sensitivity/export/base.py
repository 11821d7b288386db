"""One base class per export format, declaring the packages it needs (diffusers' ``DiffusersQuantizer``
``required_packages`` pattern), and the format table.

```python
class MyExporter(Exporter):
    name = "mine"
    required_packages = ("mypkg",)      # import names; checked before anything is written
    extra = "mine"                      # pip install "sensitivity[mine]"
    def write(self, plan, folder, **options): ...   # -> the export record
```

Each exporter is registered in :data:`sensitivity.export.methods.EXPORT_FORMATS` (the project's
:class:`~sensitivity.registry.Registry`, lazily: this module); :func:`get_exporter` returns it (one line for
an unknown name). The writers and loaders import their packages lazily, so the core
package never imports an optional integration.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, ClassVar, Dict, Tuple

from ..errors import SensitivityError
from .methods import EXPORT_FORMATS


class Exporter:
    """Base of every export format: ``name``, ``required_packages``, ``extra``, ``write`` and ``load``."""

    name: ClassVar[str] = ""
    #: import names the format needs besides the core (checked by :meth:`validate_environment`)
    required_packages: ClassVar[Tuple[str, ...]] = ()
    #: the pip extra that installs them
    extra: ClassVar[str] = ""
    #: options of :meth:`write` this format reads (others are ignored)
    write_options: ClassVar[Tuple[str, ...]] = ()

    def missing_packages(self) -> Tuple[str, ...]:
        return tuple(m for m in self.required_packages if importlib.util.find_spec(m) is None)

    def validate_environment(self) -> None:
        """Raise one line naming the missing packages and the extra that installs them."""
        missing = self.missing_packages()
        if missing:
            raise SensitivityError(f"--format {self.name} needs {', '.join(missing)}: "
                                   f"pip install \"sensitivity[{self.extra or self.name}]\"")

    def check_options(self, options: Dict[str, Any]) -> Dict[str, Any]:
        """The write options after validation (before anything is written); subclasses extend."""
        return {k: v for k, v in options.items() if k in self.write_options}

    def write(self, plan, folder: Path, **options) -> Dict[str, Any]:  # pragma: no cover - abstract
        """Write ``plan`` into the empty temporary ``folder``; return the export record."""
        raise NotImplementedError

    def load(self, folder: Path, record: Dict[str, Any], **kwargs):
        """The exported denoiser as a torch module (formats that have one)."""
        raise SensitivityError(f"{folder} is an {self.name} export: it is not loaded as a torch model")


class PackedExporter(Exporter):
    """``packed``: our safetensors format (:mod:`.packed`), run-time kernels per layer (:mod:`.runtime`)."""

    name = "packed"
    write_options = ("float_dtype", "example_inputs", "cache_budget")

    def write(self, plan, folder, **options):
        from .packed import write_packed

        return write_packed(plan, folder, **options)

    def load(self, folder, record, **kwargs):
        from .packed import load_packed

        return load_packed(folder, record, **kwargs)


class SdnqExporter(Exporter):
    """``sdnq``: a diffusers folder for the SDNQ backend (:mod:`.sdnq_format`, GPL-3.0 ``sdnq``)."""

    name = "sdnq"
    required_packages = ("sdnq",)
    extra = "sdnq"
    write_options = ("pipeline",)

    def write(self, plan, folder, **options):
        from .sdnq_format import write_sdnq

        return write_sdnq(plan, folder, **options)

    def load(self, folder, record, **kwargs):
        from .sdnq_format import load_sdnq

        return load_sdnq(folder, record, **{k: v for k, v in kwargs.items() if k in ("device", "dtype", "expect_class")})


class OnnxExporter(Exporter):
    """``onnx``: ``torch.onnx`` + codes as UINT4 / uint8 initializers (:mod:`.onnx_format`), run in onnxruntime."""

    name = "onnx"
    required_packages = ("onnx", "onnxruntime", "onnxscript")
    extra = "onnx"
    write_options = ("opset", "example_inputs", "optimize", "calibration_inputs")

    def check_options(self, options):
        from .onnx_format import check_opset

        options = super().check_options(options)
        options["opset"] = check_opset(options.get("opset", 21))
        return options

    def write(self, plan, folder, **options):
        from .onnx_format import write_onnx

        return write_onnx(plan, folder, **options)

    def load(self, folder, record, **kwargs):
        raise SensitivityError(f"{folder} is an onnx export: run it with onnxruntime "
                               "(sensitivity.export.onnx_format.run_onnx), it is not a torch model")


for _cls in (PackedExporter, SdnqExporter, OnnxExporter):
    EXPORT_FORMATS.register(_cls.name, _cls())


def get_exporter(name: str) -> Exporter:
    """The exporter of format ``name`` (one line naming the known formats for an unknown one)."""
    return EXPORT_FORMATS.get(name)
