"""The settings of a cerebellum service: its microzones, learning rate and cache.

A cortex (or an operator) sends these as a msgpack map in ``Configure``; the same
map is stored in every checkpoint, so a fresh server can rebuild the microzones
before loading their weights. Every check names the key at fault and the value it
expected, and the parameter count is bounded so that a mistyped width cannot make
a server allocate more than it can hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cerebellum_service.learning import LocalCerebellum
from cerebellum_service.network import Microzone

ZONE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""Parameter dtypes a microzone may have."""

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Dtypes of a cerebellum's arithmetic (``LocalCerebellum.compute_dtype``)."""

PRECISIONS = ("auto", *COMPUTE_DTYPES)
"""What a cerebellum actor may be asked to compute in; ``auto`` resolves by
:func:`resolve_precision`."""

LESIONS = (None, "cerebellum", "olive")
"""``cerebellum``: no predictions; ``olive``: predictions go on, learning stops."""

LEARNING = ("background", "on_update")
"""When the server learns: ``background``, a learner thread updates as soon as
observations arrive; ``on_update``, only when a Learn frame asks (``update``), so
that a client can make the server's updates fall where an in-process
cerebellum's would."""

MAX_ZONES = 64
MAX_WIDTH = 2**20
MAX_GRANULE_LAYERS = 8
MAX_CACHE_SIZE = 10**7
MAX_ZONE_PARAMETERS = 2**26
"""Default bound on one microzone's parameters (and connectivity) count."""

_ZONE_KEYS = (
    "name",
    "in_features",
    "out_features",
    "granule_width",
    "granule_layers",
    "inputs_per_granule",
    "context_size",
    "seed",
    "init_seed",
    "dtype",
)
_TOP_KEYS = (
    "zones",
    "lr",
    "cache_size",
    "lesion",
    "learning",
    "compute_dtype",
    "answer_zeros",
)
# Names the zones' container already uses for attributes (keys, train, ...).
_NAME_PROBE = nn.ModuleDict()


class ConfigError(ValueError):
    """A configuration that cannot be used; ``key`` names the setting at fault.

    Attributes:
        key: path of the setting, e.g. ``zones[1].in_features``.
        too_large: the setting is well-formed but asks for too much memory.
    """

    def __init__(self, key: str, message: str, *, too_large: bool = False) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.too_large = too_large


@dataclass(frozen=True)
class ZoneSpec:
    """One microzone's shape and seeds (the keyword arguments of ``Microzone``).

    ``seed`` draws the sparse mossy-fibre connectivity; ``init_seed`` (default:
    ``seed``) the initial weights, so that the same spec builds the same
    microzone in every process.
    """

    name: str
    in_features: int
    out_features: int
    granule_width: int = 400
    granule_layers: int = 1
    inputs_per_granule: int | None = None
    context_size: int = 0
    seed: int = 0
    init_seed: int | None = None
    dtype: str = "float32"

    @property
    def parameter_count(self) -> int:
        """Weights, biases and connectivity mask of the microzone."""
        fan_in = self.in_features + self.context_size
        width = self.granule_width
        mossy = fan_in * width * (1 if self.inputs_per_granule is None else 2)
        hidden = (self.granule_layers - 1) * (width * width + width)
        return mossy + width + hidden + width * self.out_features + self.out_features

    def build(self) -> Microzone:
        """The microzone, weights drawn from ``init_seed``; the global RNG is kept."""
        init_seed = self.seed if self.init_seed is None else self.init_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            zone = Microzone(
                self.in_features,
                self.out_features,
                granule_width=self.granule_width,
                granule_layers=self.granule_layers,
                inputs_per_granule=self.inputs_per_granule,
                context_size=self.context_size,
                seed=self.seed,
            )
        return zone.to(ZONE_DTYPES[self.dtype])


@dataclass(frozen=True)
class CerebellumConfig:
    """Everything ``Configure`` sets: microzones, learning rate, cache, lesion,
    when the server learns (:data:`LEARNING`) and the dtype of its arithmetic
    (:data:`COMPUTE_DTYPES`).

    ``answer_zeros`` makes the server a measuring device, not a cerebellum: it
    checks every query as usual, then answers it with zero feedback of the
    right shape and dtype without computing or caching anything, so it learns
    nothing (later observations are cache misses). ``ccdni bench --profile``
    uses it to time decoupled without the cerebellum's arithmetic while every
    message still travels.
    """

    zones: tuple[ZoneSpec, ...]
    lr: float = 1e-3
    cache_size: int = 4096
    lesion: str | None = None
    learning: str = "background"
    compute_dtype: str = "float32"
    answer_zeros: bool = False
    zone_names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "zone_names", tuple(z.name for z in self.zones))

    def build(self) -> LocalCerebellum:
        """A fresh ``LocalCerebellum`` with these settings (olive lesion applied)."""
        cerebellum = LocalCerebellum(
            {spec.name: spec.build() for spec in self.zones},
            lr=self.lr,
            cache_size=self.cache_size,
            compute_dtype=COMPUTE_DTYPES[self.compute_dtype],
        )
        cerebellum.frozen = self.lesion == "olive"
        return cerebellum

    def to_dict(self) -> dict[str, Any]:
        """The msgpack-ready map, every default filled in."""
        return {
            "zones": [asdict(spec) for spec in self.zones],
            "lr": self.lr,
            "cache_size": self.cache_size,
            "lesion": self.lesion,
            "learning": self.learning,
            "compute_dtype": self.compute_dtype,
            "answer_zeros": self.answer_zeros,
        }

    def with_lesion(self, lesion: str | None) -> CerebellumConfig:
        return dataclasses.replace(self, lesion=lesion)

    @classmethod
    def from_dict(
        cls, raw: object, *, max_zone_parameters: int = MAX_ZONE_PARAMETERS
    ) -> CerebellumConfig:
        """Validate a decoded msgpack map.

        Raises:
            ConfigError: a missing, unknown, mistyped or out-of-range key, or a
                microzone above ``max_zone_parameters``.
        """
        raw = _mapping(raw, "config", _TOP_KEYS)
        if "zones" not in raw:
            raise ConfigError("zones", "is missing; expected a list of microzones")
        zones_raw = raw["zones"]
        if not isinstance(zones_raw, Sequence) or isinstance(zones_raw, str | bytes):
            raise ConfigError(
                "zones", f"is a {type(zones_raw).__name__}; expected a list of maps"
            )
        if not 1 <= len(zones_raw) <= MAX_ZONES:
            raise ConfigError(
                "zones", f"has {len(zones_raw)} entries; expected 1 to {MAX_ZONES}"
            )

        zones = tuple(
            _zone(entry, f"zones[{index}]", max_zone_parameters)
            for index, entry in enumerate(zones_raw)
        )
        names = [zone.name for zone in zones]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError("zones", f"names {duplicates} repeat; expected unique")
        return cls(
            zones=zones,
            lr=_number(raw.get("lr", 1e-3), "lr"),
            cache_size=_integer(
                raw.get("cache_size", 4096), "cache_size", 1, MAX_CACHE_SIZE
            ),
            lesion=parse_lesion(raw.get("lesion"), "lesion"),
            learning=_choice(raw.get("learning", "background"), "learning", LEARNING),
            compute_dtype=_choice(
                raw.get("compute_dtype", "float32"), "compute_dtype", COMPUTE_DTYPES
            ),
            answer_zeros=_boolean(raw.get("answer_zeros", False), "answer_zeros"),
        )


def resolve_precision(requested: str, device: torch.device | None = None) -> str:
    """The compute dtype for ``requested`` (:data:`PRECISIONS`) on ``device``.

    ``auto`` is ``bfloat16`` where the device computes it natively (a GPU that
    supports it; a CPU with AVX512-BF16 or AMX, or an Arm CPU with BF16) and
    ``float32`` elsewhere, where bfloat16 would be emulated, more slowly than
    float32 is computed.

    Raises:
        ConfigError: ``requested`` is not one of :data:`PRECISIONS`.
    """
    precision = _choice(requested, "precision", PRECISIONS)
    if precision != "auto":
        return precision
    device = device or torch.device("cpu")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = native_cpu_bfloat16()
    return "bfloat16" if native else "float32"


def native_cpu_bfloat16() -> bool:
    """Whether this machine's CPU computes bfloat16 matrix products in hardware."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("Features") and "bf16" in line.split():
                    return True  # Arm's FEAT_BF16
    except OSError:
        pass
    return False


def parse_lesion(value: object, key: str = "lesion") -> str | None:
    """Validate a lesion setting (``None``, ``"cerebellum"`` or ``"olive"``)."""
    if value not in LESIONS or isinstance(value, bool):
        raise ConfigError(key, f"is {value!r}; expected one of {list(LESIONS)}")
    return value


def _mapping(raw: object, key: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"is a {type(raw).__name__}; expected a map")
    unknown = sorted(repr(k) for k in raw if k not in allowed)
    if unknown:
        raise ConfigError(
            key, f"has unknown key(s) {', '.join(unknown)}; expected {list(allowed)}"
        )
    return raw


def _zone(raw: object, key: str, max_parameters: int) -> ZoneSpec:
    raw = _mapping(raw, key, _ZONE_KEYS)
    for required in ("name", "in_features", "out_features"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}", "is missing")
    name = raw["name"]
    if not isinstance(name, str) or not 1 <= len(name) <= 200:
        raise ConfigError(
            f"{key}.name", f"is {name!r}; expected a string of 1 to 200 characters"
        )
    if "." in name or hasattr(_NAME_PROBE, name):
        raise ConfigError(
            f"{key}.name",
            f"is {name!r}; microzone names cannot contain '.' or be an attribute "
            "of torch.nn.ModuleDict; expected e.g. 'state_0' or 'output_1'",
        )

    in_features = _integer(raw["in_features"], f"{key}.in_features", 1, MAX_WIDTH)
    context_size = _integer(
        raw.get("context_size", 0), f"{key}.context_size", 0, MAX_WIDTH
    )
    inputs = raw.get("inputs_per_granule")
    if inputs is not None:
        inputs = _integer(
            inputs, f"{key}.inputs_per_granule", 1, in_features + context_size
        )
    dtype = raw.get("dtype", "float32")
    if dtype not in ZONE_DTYPES:
        raise ConfigError(
            f"{key}.dtype", f"is {dtype!r}; expected one of {list(ZONE_DTYPES)}"
        )
    init_seed = raw.get("init_seed")
    spec = ZoneSpec(
        name=name,
        in_features=in_features,
        out_features=_integer(raw["out_features"], f"{key}.out_features", 1, MAX_WIDTH),
        granule_width=_integer(
            raw.get("granule_width", 400), f"{key}.granule_width", 1, MAX_WIDTH
        ),
        granule_layers=_integer(
            raw.get("granule_layers", 1),
            f"{key}.granule_layers",
            1,
            MAX_GRANULE_LAYERS,
        ),
        inputs_per_granule=inputs,
        context_size=context_size,
        seed=_integer(raw.get("seed", 0), f"{key}.seed", 0, 2**63 - 1),
        init_seed=None
        if init_seed is None
        else _integer(init_seed, f"{key}.init_seed", 0, 2**63 - 1),
        dtype=dtype,
    )
    if spec.parameter_count > max_parameters:
        raise ConfigError(
            key,
            f"microzone {name!r} would hold {spec.parameter_count} parameters; "
            f"the server allows {max_parameters} (narrow granule_width or the "
            "widths, or raise the server's limit)",
            too_large=True,
        )
    return spec


def _choice(value: object, key: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(key, f"is {value!r}; expected one of {list(allowed)}")
    return value


def _boolean(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"is {value!r}; expected true or false")
    return value


def _integer(value: object, key: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise ConfigError(key, f"is {value!r}; expected an integer")
    if not low <= value <= high:
        raise ConfigError(key, f"is {value}; expected {low} to {high}")
    return value


def _number(value: object, key: str) -> float:
    if type(value) not in (int, float):
        raise ConfigError(key, f"is {value!r}; expected a number")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"is {value}; expected a finite number > 0")
    return float(value)
