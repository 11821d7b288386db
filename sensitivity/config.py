"""Quantization configs: which option each layer uses.

A config file (``quant_configs/*.json``)::

    {"model": "digits-dit:shipped", "multiquantizer_hash": "…", "options": {"layer": "uaq-4", …},
     "avg_bits": 3.87, "provenance": {"command": "search", "seed": 0, …}}

Layers absent from ``options`` stay in full precision. Option names are stored canonically
(``mse-4`` is read as ``uaq-4``). The reference's ``.pkl`` configs (``{mq_name: "method-bits"}``, names
ending in ``.weight_quantizer`` / ``.weight_quantizer_0`` and prefixed ``model.``) are read only with
``trust_pickle=True``, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .errors import ConfigError, SensitivityError, UnknownOptionError
from .options import FP16, QuantOption


def canonical_options(options: Mapping[str, str], source: str = "config") -> Dict[str, str]:
    """``{layer: option}`` with canonical option names; raises ConfigError naming the bad entry."""
    out = {}
    for layer, opt in options.items():
        try:
            out[str(layer)] = QuantOption.parse(opt).name
        except UnknownOptionError as exc:
            raise ConfigError(f"{source}: layer {layer!r}: {exc}") from None
    return out


def normalize_config(options: Mapping[str, str]) -> Dict[str, str]:
    """Canonical option names, ``fp16`` entries removed (absent = full precision), keys sorted."""
    out = {}
    for layer, opt in canonical_options(options).items():
        if opt != FP16:
            out[layer] = opt
    return dict(sorted(out.items()))


def config_hash(options: Mapping[str, str]) -> str:
    """The hash of a ``{layer: option}`` config (hex, 16 bytes): the one used by configs, caches,
    predictors and insights.

    BLAKE2b of the sorted canonical ``(layer, option)`` pairs with ``fp16`` entries dropped, so a layer
    set to ``fp16`` and a layer left out (both full precision) hash alike, and so do aliases
    (``mse-4`` = ``uaq-4``) and key order.
    """
    blob = json.dumps(sorted(normalize_config(options).items()), separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def _reference_layer_name(name: str) -> str:
    """``model.up_blocks.0.resnets.0.conv1.weight_quantizer_0`` -> ``up_blocks.0.resnets.0.conv1#skip``."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if name.endswith(".weight_quantizer_0"):
        return name[: -len(".weight_quantizer_0")] + "#skip"
    if name.endswith(".weight_quantizer"):
        return name[: -len(".weight_quantizer")]
    return name


@dataclass
class QuantConfig:
    """A ``{layer: option}`` assignment with its provenance."""

    options: Dict[str, str]
    model: Optional[str] = None
    multiquantizer_hash: Optional[str] = None
    avg_bits: Optional[float] = None
    provenance: Dict[str, Any] = field(default_factory=dict)
    act_bits: Optional[int] = None  # activation bits of the protocol the config was chosen under (None: fp)

    def __post_init__(self) -> None:
        self.options = canonical_options(self.options)
        if self.act_bits is not None:
            try:
                self.act_bits = int(self.act_bits)
            except (TypeError, ValueError):
                raise ConfigError(f"config: act_bits {self.act_bits!r} is not an integer") from None

    def check_model(self, model_id: Optional[str], source: str = "config") -> None:
        """Raise ConfigError unless this config may be used on ``model_id`` (``family:weights``).

        The one rule of every command: ``model`` may be absent, the family name alone
        (``"digits-dit"``), or a full id, which must then be ``model_id`` itself."""
        if not self.model or not model_id:
            return
        mine, want = str(self.model), str(model_id)
        if mine.split(":", 1)[0] != want.split(":", 1)[0] or (":" in mine and ":" in want and mine != want):
            raise ConfigError(f"{source} is a config of {mine}, not of {want}")

    @property
    def config_hash(self) -> str:
        """:func:`config_hash` of the options (fp16 entries do not change it)."""
        return config_hash(self.options)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "multiquantizer_hash": self.multiquantizer_hash,
            "options": dict(self.options),
            "avg_bits": self.avg_bits,
            "provenance": self.provenance,
            **({"act_bits": self.act_bits} if self.act_bits is not None else {}),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temp file + rename)."""
        from .io import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", what="config")

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "config") -> "QuantConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object")
        if "options" in d:
            options = d["options"]
            if not isinstance(options, Mapping):
                raise ConfigError(f"{source}: 'options' must be an object {{layer: option}}")
            meta = {k: d.get(k) for k in ("model", "multiquantizer_hash", "avg_bits", "act_bits")}
            return cls(canonical_options(options, source), provenance=dict(d.get("provenance") or {}), **meta)
        # a bare {layer: option} mapping
        if all(isinstance(v, str) for v in d.values()):
            return cls(canonical_options(d, source))
        raise ConfigError(f"{source}: expected {{'options': {{layer: option}}, ...}} or a {{layer: option}} mapping")

    @classmethod
    def load(cls, path: str | os.PathLike, trust_pickle: bool = False) -> "QuantConfig":
        """Read a JSON config, or a reference ``.pkl`` config when ``trust_pickle`` is set."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        if path.suffix in (".pkl", ".pickle"):
            if not trust_pickle:
                raise ConfigError(
                    f"{path}: refusing to unpickle (it can run arbitrary code); pass --trust-pickle if you trust it"
                )
            with open(path, "rb") as fh:
                try:
                    raw = pickle.load(fh)
                except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
                    raise ConfigError(f"{path}: cannot read pickle ({type(exc).__name__}: {exc})") from None
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{path}: expected a dict {{layer: 'method-bits'}} in the pickle")
            opts = {}
            split = {str(k)[: -len("_0")] for k in raw if str(k).endswith(".weight_quantizer_0")}
            for k, v in raw.items():
                v = v[0] if isinstance(v, (list, tuple)) else v
                name = _reference_layer_name(str(k))
                if str(k) in split:  # first half of a split layer
                    name += "#main"
                opts[name] = v
            return cls(canonical_options(opts, str(path)), provenance={"imported_from": str(path)})
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))


def as_options(config: "QuantConfig | Mapping[str, str]") -> Dict[str, str]:
    """The canonical ``{layer: option}`` of a QuantConfig or a plain mapping."""
    if isinstance(config, QuantConfig):
        return dict(config.options)
    if isinstance(config, Mapping):
        return canonical_options(config)
    raise SensitivityError(f"expected a QuantConfig or a {{layer: option}} mapping, got {type(config).__name__}")
