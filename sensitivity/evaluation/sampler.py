"""Random configs as in the reference (docs/method.md §3), reproducible from ``(seed, index)``.

Per config ``i`` of a run with seed ``s``:

* draw ``p ~ U(0, 1)``;
* for every layer, draw the bit width: with the reference's two widths {3, 4}, the layer is 3-bit with
  probability ``p`` and 4-bit otherwise. With ``k`` allowed widths ``b_0 < … < b_{k-1}`` (``bits=``), the
  layer takes ``b_{k-1-j}`` with ``j ~ Binomial(k-1, p)`` — the same rule for ``k = 2``, and ``p`` still
  moves the whole config from high to low bits;
* the method is uniform over the allowed methods that have an option at that width.

Every draw comes from a keyed BLAKE2b hash of ``(seed, index, layer name, purpose)``, not from a
stateful generator, so config ``i`` is the same on every machine, numpy/torch version and worker count,
whatever order the configs are drawn in, and a layer's draw does not shift when another layer is fixed.
Tied layers (DiT's shared timestep embedder) are one layer in a multiquantizer's layer list, so they
are sampled once. Layers fixed to ``fp16`` are left out of the returned mapping (absent = full precision),
so the config hash of a config does not depend on how full precision was spelled.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ConfigError, SensitivityError
from ..options import FP16, OPTION_NAMES, QuantOption, canonical, canonical_method

_SCALE = 1.0 / 2**64


def _uniforms(seed: int, index: int, key: str, n: int) -> List[float]:
    """``n`` (≤ 4) independent uniforms in [0, 1) from the hash of ``(seed, index, key)``."""
    h = hashlib.blake2b(f"{int(seed)}\x1f{int(index)}\x1f{key}".encode(), digest_size=32,
                        person=b"sens.sampler.v1").digest()
    return [x * _SCALE for x in struct.unpack("<4Q", h)[:n]]


def _names(layers: Iterable) -> List[str]:
    out = []
    for layer in layers:
        name = layer if isinstance(layer, str) else getattr(layer, "name", None)
        if not isinstance(name, str):
            raise SensitivityError(f"sampler: expected layer names or LayerSpecs, got {type(layer).__name__}")
        out.append(name)
    if len(set(out)) != len(out):
        raise SensitivityError("sampler: the layer list holds duplicate names")
    return out


def parse_bits(spec: Union[None, str, int, Sequence[int]]) -> Optional[Tuple[int, ...]]:
    """``"3-4"``, ``"3,4"``, ``4`` or ``[3, 4]`` -> sorted tuple of widths; ``None`` stays ``None``."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, str):
        text = spec.replace(" ", "")
        try:
            if "-" in text:
                lo, hi = (int(x) for x in text.split("-", 1))
                vals = range(min(lo, hi), max(lo, hi) + 1)
            else:
                vals = [int(x) for x in text.split(",") if x]
        except ValueError:
            raise ConfigError(f"bits {spec!r}: expected a range like '3-4' or a list like '3,4'") from None
    else:
        vals = [int(x) for x in spec]
    out = tuple(sorted(set(vals)))
    if not out:
        raise ConfigError(f"bits {spec!r}: no bit width given")
    return out


@dataclass(frozen=True)
class SamplerSpec:
    """Settings of the random-config sampler; ``to_dict()`` is stored with each run in the cache.

    ``options``: option names available per layer (the multiquantizer's). ``bits``: allowed widths
    (``None`` = all widths in ``options``). ``methods``: allowed methods (``None`` = all; aliases such
    as ``mse``/``kmeans``/``kmeans_all`` accepted). ``fixed``: ``{layer name or fnmatch pattern: option}``
    for layers that are not sampled (``"fp16"`` keeps a layer in full precision); the first matching
    pattern wins, exact names before patterns.
    """

    seed: int = 0
    options: Tuple[str, ...] = OPTION_NAMES
    bits: Optional[Tuple[int, ...]] = None
    methods: Optional[Tuple[str, ...]] = None
    fixed: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        opts = tuple(dict.fromkeys(canonical(o) for o in self.options if canonical(o) != FP16))
        object.__setattr__(self, "options", opts)
        object.__setattr__(self, "bits", parse_bits(self.bits))
        if self.methods is not None:
            meths = []
            for m in self.methods:
                try:
                    meths.append(canonical_method(m))
                except SensitivityError:
                    raise ConfigError(f"sampler: unknown method {m!r}") from None
            object.__setattr__(self, "methods", tuple(dict.fromkeys(meths)))
        fixed = self.fixed.items() if isinstance(self.fixed, Mapping) else self.fixed
        canon = []
        for pat, opt in fixed:
            try:
                canon.append((str(pat), canonical(opt)))
            except SensitivityError as exc:
                raise ConfigError(f"sampler: fixed layer {pat!r}: {exc}") from None
        object.__setattr__(self, "fixed", tuple(canon))
        by_bits = self.choices_by_bits()
        if not by_bits:
            raise ConfigError(
                f"sampler: no option left to sample (options {', '.join(self.options) or 'none'}, "
                f"bits {self.bits or 'any'}, methods {', '.join(self.methods) if self.methods else 'any'})"
            )

    def choices_by_bits(self) -> Dict[int, Tuple[str, ...]]:
        """``{bits: (option names, ...)}`` of the sampled options, widths ascending."""
        out: Dict[int, List[str]] = {}
        for name in self.options:
            o = QuantOption.parse(name)
            if self.bits is not None and o.bits not in self.bits:
                continue
            if self.methods is not None and o.method not in self.methods:
                continue
            out.setdefault(o.bits, []).append(name)
        return {b: tuple(sorted(out[b])) for b in sorted(out)}

    def fixed_option(self, layer: str) -> Optional[str]:
        for pat, opt in self.fixed:
            if pat == layer:
                return opt
        for pat, opt in self.fixed:
            if fnmatch.fnmatchcase(layer, pat):
                return opt
        return None

    def check_layers(self, layers: Iterable) -> None:
        """Raise ConfigError if a fixed name/pattern matches no layer, or fixes an option not available."""
        names = _names(layers)
        for pat, opt in self.fixed:
            if not any(pat == n or fnmatch.fnmatchcase(n, pat) for n in names):
                raise ConfigError(f"sampler: fixed layer {pat!r} matches no layer of the multiquantizer")
            if opt != FP16 and opt not in self.options:
                raise ConfigError(f"sampler: fixed layer {pat!r}: option {opt!r} is not in the multiquantizer")

    def sample(self, layers: Iterable, index: int) -> Dict[str, str]:
        """Config ``index`` of this run: ``{layer: option}`` (fp16 layers omitted)."""
        return sample_config(layers, self.seed, index, spec=self)

    def to_dict(self) -> dict:
        return {
            "algorithm": "reference-p-uniform/v1",
            "seed": int(self.seed),
            "options": list(self.options),
            "bits": list(self.bits) if self.bits is not None else None,
            "methods": list(self.methods) if self.methods is not None else None,
            "fixed": [list(x) for x in self.fixed],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "SamplerSpec":
        return cls(
            seed=int(d["seed"]),
            options=tuple(d["options"]),
            bits=tuple(d["bits"]) if d.get("bits") is not None else None,
            methods=tuple(d["methods"]) if d.get("methods") is not None else None,
            fixed=tuple(tuple(x) for x in d.get("fixed") or ()),
        )

    def signature(self) -> str:
        """Stable hash (hex) of the settings; two specs with the same signature draw the same configs."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()


def _binomial(n: int, p: float, us: Sequence[float]) -> int:
    return sum(1 for u in us[:n] if u < p)


def sample_config(
    layers: Iterable,
    seed: int,
    index: int,
    *,
    options: Sequence[str] = OPTION_NAMES,
    bits: Union[None, str, Sequence[int]] = None,
    methods: Optional[Sequence[str]] = None,
    fixed: Optional[Mapping[str, str]] = None,
    spec: Optional[SamplerSpec] = None,
) -> Dict[str, str]:
    """Config ``index`` of the run with ``seed``: ``{layer: option}`` over ``layers`` (names or LayerSpecs).

    Deterministic in ``(seed, index, layer names, settings)``; see the module docstring for the
    distribution. Pass ``spec`` to reuse validated settings (then the keyword settings are ignored).
    """
    if spec is None:
        spec = SamplerSpec(seed=seed, options=tuple(options), bits=bits, methods=methods,
                           fixed=tuple((fixed or {}).items()))
    names = _names(layers)
    by_bits = spec.choices_by_bits()
    widths = list(by_bits)  # ascending
    k = len(widths)
    if k > 4:
        raise ConfigError(f"sampler: at most 4 bit widths are supported, got {widths}")
    (p,) = _uniforms(seed, index, "\x00p", 1)
    out: Dict[str, str] = {}
    for name in names:
        fixed_opt = spec.fixed_option(name)
        if fixed_opt is not None:
            if fixed_opt != FP16:
                out[name] = fixed_opt
            continue
        u = _uniforms(seed, index, name, 4)
        # u[0], u[1], u[2]: Binomial trials for the width; u[3]: the method
        j = _binomial(k - 1, p, u[:3]) if k > 1 else 0
        choices = by_bits[widths[k - 1 - j]]
        out[name] = choices[min(int(u[3] * len(choices)), len(choices) - 1)]
    return out


def sample_configs(layers: Iterable, seed: int, indices: Iterable[int], **kwargs) -> List[Dict[str, str]]:
    """``[sample_config(layers, seed, i, **kwargs) for i in indices]`` with the settings validated once."""
    names = _names(layers)
    spec = kwargs.pop("spec", None) or SamplerSpec(
        seed=seed,
        options=tuple(kwargs.pop("options", OPTION_NAMES)),
        bits=kwargs.pop("bits", None),
        methods=kwargs.pop("methods", None),
        fixed=tuple((kwargs.pop("fixed", None) or {}).items()),
    )
    if kwargs:
        raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
    return [sample_config(names, seed, i, spec=spec) for i in indices]
