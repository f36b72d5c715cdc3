"""Method config: presets as data, flags over presets, validation messages, the bits formula."""

from __future__ import annotations

import math

import pytest

from spqr_cli.core.config import ConfigError, QuantConfig, build_config, list_presets, load_preset


def test_every_preset_loads_and_round_trips() -> None:
    names = list_presets()
    assert {"spqr-3.9bit", "spqr-4.6bit", "spqr-4.7bit", "gptq-4bit-g128", "gptq-3bit-g128",
            "rtn-4bit-g128"} <= set(names)
    for name in names:
        cfg = load_preset(name)
        assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_defaults_are_the_3_9_bit_preset() -> None:
    # the preset also searches group ranges; the dataclass default stays 0: configs saved without the field
    # (before it existed) had min/max ranges
    assert QuantConfig(clip_grid=100) == load_preset("spqr-3.9bit") and QuantConfig().clip_grid == 0
    assert build_config(wbits=3) == load_preset("spqr-3.9bit")


def test_the_4_7_bit_preset_is_the_measured_best_point() -> None:
    """spqr-4.7bit is the flags of docs/benchmarks.md section 16's best point at <= 4.7 measured bits, and a flag
    still turns its asymmetric calibration off (for several ranks)."""
    cfg = load_preset("spqr-4.7bit")
    assert (cfg.wbits, cfg.groupsize, cfg.beta2, cfg.stat_bits, cfg.target_bits) == (4, 32, 16, 3, 4.7)
    assert (cfg.percdamp, cfg.clip_grid, cfg.asym_calib) == (0.01, 100, True)
    assert build_config(preset="spqr-4.7bit", asym_calib=False).asym_calib is False


def test_flags_override_presets_and_methods_have_defaults() -> None:
    cfg = build_config(preset="gptq-4bit-g128", wbits=3, groupsize=None)
    assert (cfg.method, cfg.wbits, cfg.groupsize) == ("gptq", 3, 128)
    rtn = build_config(method="rtn")
    assert rtn.method == "rtn" and not rtn.has_outliers and rtn.stat_bits == 16
    with pytest.raises(ConfigError, match="contradicts"):
        build_config(preset="gptq-4bit-g128", method="spqr")
    with pytest.raises(ConfigError, match="not found"):
        load_preset("no-such-preset")


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"wbits": 1}, "wbits"), ({"method": "awq"}, "unknown method"), ({"perm": "random"}, "permutation"),
     ({"stat_bits": 12}, "stat-bits"), ({"percdamp": 0}, "percdamp"), ({"groupsize": 12}, "groupsize")],
)
def test_bad_values_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**changes)


def test_formula_bits() -> None:
    spqr = load_preset("spqr-3.9bit")
    # 3-bit codes + two 3-bit stats per 16 weights + four fp16 second-level values per 16x16 tile + perm
    assert spqr.formula_bits(4096, 4096) == pytest.approx(3 + 6 / 16 + 64 / 256 + 32 / 4096)
    assert spqr.formula_bits(4096, 4096, outlier_fraction=0.01) == pytest.approx(3.625 + 32 / 4096 + 0.32)
    rtn = load_preset("rtn-4bit-g128")
    assert rtn.formula_bits(4096, 4096) == pytest.approx(4 + 32 / 128)
    assert math.isinf(rtn.outlier_threshold) and rtn.to_dict()["outlier_threshold"] == "inf"
