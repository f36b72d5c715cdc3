"""The method's parameters: one dataclass, presets loaded from ``configs/*.yaml``.

Every artifact (quantization records, packed checkpoints) stores ``QuantConfig.to_dict()`` so a result can be
traced back to the exact parameters that produced it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spqr_cli.core.errors import ConfigError
from spqr_cli.quant.methods import get_method, method_names

__all__ = ["ConfigError", "QuantConfig", "build_config", "default_for_method", "list_presets", "load_preset"]


def _config_dir() -> Path:
    """Where the presets live: ``spqr_cli/configs`` in a wheel (pyproject maps the top-level ``configs/`` there),
    the repository's top-level ``configs/`` in a source checkout or editable install."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "configs"
    return packaged if packaged.is_dir() else package.parent / "configs"


CONFIG_DIR = _config_dir()
PERMS = ("act_order", "identity")


@dataclass(frozen=True)
class QuantConfig:
    """Parameters of SpQR and of its special cases GPTQ and RTN.

    ``groupsize`` is β1 (columns sharing first-level statistics; 0 means one group per row, i.e. per-channel).
    ``beta2`` is the number of rows whose first-level statistics share one second-level (fp16) scale/zero.
    ``stat_bits`` is the width of the quantized first-level scale and zero; 16 keeps them in fp16 (GPTQ/RTN).
    ``outlier_threshold`` is τ, relative to the group's baseline error; ``inf`` disables outliers.
    ``target_bits`` (optional) replaces the fixed τ with a per-layer one: each layer keeps as many outliers as fit
    in that many bits per weight, measured from its packed bytes (``spqr_kernels.layout.packed_nbytes``).
    ``tune_steps`` (0: off) Adam steps of the block fine-tune after each block is quantized (``quant.tune``), at
    relative learning rate ``tune_lr``.
    ``clip_grid`` (0: off) shrunken ranges tried per row when a group's statistics are fitted
    (``quant.grid.clipped_range``); 0 keeps the paper's min/max ranges.
    ``asym_calib`` (GPTAQ's asymmetric calibration): each layer is fitted to reproduce the fp16 model's output on
    the fp16 model's inputs from the inputs the quantized model gives it (``quant.hessian.asym_target``), instead
    of the fp16 layer's output on the quantized model's inputs.
    """

    method: str = "spqr"
    wbits: int = 3
    groupsize: int = 16
    beta2: int = 16
    stat_bits: int = 3
    outlier_threshold: float = 0.2
    perm: str = "act_order"
    percdamp: float = 1.0
    blocksize: int = 128
    sym: bool = False
    target_bits: float | None = None
    tune_steps: int = 0
    tune_lr: float = 3e-3
    clip_grid: int = 0
    asym_calib: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self._check_types()
        if self.method not in method_names():
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(method_names())}")
        if not 2 <= self.wbits <= 8:
            raise ConfigError(f"--wbits {self.wbits} is not supported; use 2..8 (3 or 4 are the usual choices)")
        if self.groupsize < 0 or (self.groupsize and self.groupsize % 8 and self.groupsize not in (1, 2, 4)):
            raise ConfigError(f"--groupsize {self.groupsize} must be 0 (per-channel) or a multiple of 8")
        if self.stat_bits != 16 and not 2 <= self.stat_bits <= 8:
            raise ConfigError(f"--stat-bits {self.stat_bits} must be 2..8, or 16 for fp16 statistics")
        if self.stat_bits != 16 and self.beta2 < 1:
            raise ConfigError("--beta2 must be >= 1 when statistics are quantized")
        if self.perm not in PERMS:
            raise ConfigError(f"unknown permutation {self.perm!r}; choose one of {', '.join(PERMS)}")
        if not self.percdamp > 0:
            raise ConfigError("--percdamp must be > 0")
        if self.blocksize < 1:
            raise ConfigError("--blocksize must be >= 1")
        if math.isnan(self.outlier_threshold) or self.outlier_threshold <= 0:
            raise ConfigError(f"--outlier-threshold {self.outlier_threshold} must be a number > 0 (inf disables "
                              "outliers)")
        if not math.isfinite(self.percdamp):
            raise ConfigError(f"--percdamp {self.percdamp} must be a finite number > 0")
        if self.target_bits is not None:
            tb = self.target_bits
            if isinstance(tb, bool) or not isinstance(tb, (int, float)) or not math.isfinite(tb) or not 0 < tb < 16:
                raise ConfigError(f"--target-bits {tb!r} must be a number of bits per weight between 0 and 16 (fp16), "
                                  "e.g. 4.0")
            if not get_method(self.method).outliers:
                raise ConfigError(f"--target-bits chooses how many outliers each layer keeps; method {self.method!r} "
                                  "has none (use --method spqr, or set --wbits/--groupsize for the size you want)")

        if self.clip_grid < 0:
            raise ConfigError(f"--clip-grid {self.clip_grid} must be >= 0 (0: plain min/max ranges)")
        if self.asym_calib and self.tune_steps:
            raise ConfigError("--asym-calib and --tune-steps pull in different directions (the fine-tune matches the "
                              "original block on the quantized model's inputs); use one of them")
        if self.asym_calib and not get_method(self.method).needs_hessian:
            raise ConfigError(f"--asym-calib changes what the calibration fits; method {self.method!r} uses no "
                              "calibration (use --method spqr or gptq)")
        if self.tune_steps < 0:
            raise ConfigError(f"--tune-steps {self.tune_steps} must be >= 0 (0 turns the block fine-tune off)")
        if not (math.isfinite(self.tune_lr) and self.tune_lr > 0):
            raise ConfigError(f"--tune-lr {self.tune_lr} must be a finite number > 0 (relative, e.g. 3e-3)")

    def _check_types(self) -> None:
        """Every field has its declared type (values from YAML or JSON may not): ints are ints (not bools or
        strings), floats are numbers, so the range checks and everything after them compare numbers."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(str(f.type))
            if kind is None:
                continue
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(f"config field {f.name} = {value!r} must be of type {f.type}")

    @property
    def has_outliers(self) -> bool:
        """Whether this config keeps outliers: the method selects them and the threshold is finite."""
        return get_method(self.method).outliers and math.isfinite(self.outlier_threshold)

    @property
    def has_perm(self) -> bool:
        """Whether the quantized layers store a column permutation."""
        return self.perm == "act_order" and get_method(self.method).permutes

    def group_size_for(self, in_features: int) -> int:
        """Columns per group for a layer with ``in_features`` inputs (per-channel when groupsize is 0)."""
        return in_features if self.groupsize == 0 else self.groupsize

    def formula_bits(self, in_features: int, out_features: int, outlier_fraction: float = 0.0) -> float:
        """Average bits per parameter of an ``(out_features, in_features)`` layer by the format's formula
        (``spqr_kernels.layout.formula_bits``)."""
        from spqr_kernels.layout import formula_bits

        return formula_bits(self.wbits, self.group_size_for(in_features), self.beta2, self.stat_bits, out_features,
                            outlier_fraction, self.has_perm)

    def layer_bits(self, shapes: list[tuple[int, int]], outlier_fraction: float = 0.0) -> list[float]:
        """Measured bits per weight of layers of ``shapes`` ``(out, in)`` with ``outlier_fraction`` outliers: their
        packed bytes (``spqr_kernels.layout.packed_nbytes``), what ``spqr inspect`` reports once packed."""
        from spqr_kernels.layout import packed_nbytes

        return [8 * packed_nbytes(self.wbits, self.group_size_for(k), self.beta2, self.stat_bits, n, k,
                                  round(outlier_fraction * n * k), self.has_perm) / (n * k) for n, k in shapes]

    def model_bits(self, hidden: int = 4096, intermediate: int = 11008,
                   outlier_fraction: float = 0.0) -> tuple[float, float]:
        """``(formula, measured)`` bits per weight over a LLaMA block's linear layers (4 of ``hidden x hidden``, 3 of
        ``hidden x intermediate``; default: LLaMA-7B) with ``outlier_fraction`` outliers: what ``spqr presets``
        shows; measured as in ``layer_bits``."""
        shapes = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
        params = [n * k for n, k in shapes]
        formula = sum(self.formula_bits(k, n, outlier_fraction) * p for (n, k), p in zip(shapes, params, strict=True))
        measured = sum(b * p for b, p in zip(self.layer_bits(shapes, outlier_fraction), params, strict=True))
        return formula / sum(params), measured / sum(params)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not math.isfinite(d["outlier_threshold"]):
            d["outlier_threshold"] = "inf"
        if not d["extra"]:
            d.pop("extra")
        if d["target_bits"] is None:  # absent, as in configs saved before the field existed (same fingerprint)
            d.pop("target_bits")
        if not d["tune_steps"]:  # off: absent, as in configs saved before the fine-tune existed
            d.pop("tune_steps")
            d.pop("tune_lr")
        if not d["clip_grid"]:  # off: absent, as in configs saved before the range search existed
            d.pop("clip_grid")
        if not d["asym_calib"]:  # likewise
            d.pop("asym_calib")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Build a config from a preset or a saved ``to_dict()``; anything that is not a mapping of known fields
        with values of the right type is a ``ConfigError`` (these come from files users edit)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = {str(k) for k in d if k not in known}  # (YAML keys may be numbers: compare them as text)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        if not isinstance(d.get("extra", {}), dict):
            raise ConfigError(f"config field extra = {d['extra']!r} must be a mapping")
        d = dict(d)
        tau = d.get("outlier_threshold")
        if isinstance(tau, str):  # "inf" in saved configs (JSON has no infinity)
            try:
                d["outlier_threshold"] = float(tau)
            except ValueError:
                raise ConfigError(f"config field outlier_threshold = {tau!r} must be a number or inf") from None
        return cls(**d)

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> QuantConfig:
    """Load a preset by name (``spqr-3.9bit``) or from a YAML file path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):  # a preset name such as "spqr-3.9bit" (its ".9bit" is no suffix)
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset {name_or_path!r} not found; available: {', '.join(list_presets())}")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"preset {str(path)!r} is not readable YAML ({type(e).__name__}); fix it") from None
    if data is None:  # an empty file: the defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {str(path)!r} must be a mapping of config fields, got {type(data).__name__}")
    data.pop("description", None)
    return QuantConfig.from_dict(data)


def default_for_method(method: str, wbits: int | None = None) -> QuantConfig:
    """Each method's default config (its ``default_preset`` or ``defaults``), so that ``--method gptq --wbits 3``
    needs no other flag."""
    spec = get_method(method)
    cfg = load_preset(spec.default_preset) if spec.default_preset else QuantConfig(method=method, **spec.defaults)
    return cfg.replace(wbits=wbits)


def build_config(preset: str | None = None, method: str | None = None, **overrides: Any) -> QuantConfig:
    """The config behind ``spqr quantize``: a preset (or the method's defaults) with explicit flags on top.

    ``None`` values in ``overrides`` mean "not given on the command line" and keep the preset's value.
    """
    if preset is not None:
        cfg = load_preset(preset)
        if method is not None and method != cfg.method:
            raise ConfigError(f"--method {method} contradicts --preset {preset} (method {cfg.method}); drop one")
    else:
        cfg = default_for_method(method or "spqr", overrides.get("wbits"))
    return cfg.replace(**overrides)
