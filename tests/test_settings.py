"""Each algorithm's hyper-parameters live in one frozen dataclass: its constructor, its
docstring, its argument checks and the configuration every rank agrees on (and a checkpoint
records) all come from it."""

import dataclasses
import inspect

import numpy as np
import pytest

import ddp_hooks as dh
from ddp_hooks.core import Settings

ALGORITHMS = (dh.EFSignSGDM, dh.CSER, dh.QsparseLocalSGD, dh.DiLoCo, dh.SparseLoCo, dh.PowerSGD, dh.LAQ)


def _constructor_names(cls):
    params = inspect.signature(cls.__init__).parameters.values()
    return [p for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD]


@pytest.mark.parametrize("cls", ALGORITHMS, ids=lambda c: c.__name__)
def test_constructor_docstring_and_configuration_come_from_the_settings(cls):
    fields = {f.name: f for f in dataclasses.fields(cls.settings_type)}
    doc = inspect.getdoc(cls)
    args = " ".join(doc[doc.index("Args:") :].split())
    for p in _constructor_names(cls):
        assert p.name in fields, p.name
        assert fields[p.name].default == p.default, p.name
        assert f"{p.name}: " in args and f"default {p.default!r}" in args, p.name
    assert "**runtime" in args

    state = cls(warmup_steps=0) if cls.warmup else cls()
    assert state.settings == cls.settings_type()
    assert state.config() == {"warmup_steps": 0, **state.settings.identity()}
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.settings.seed = 3  # type: ignore[misc]


def test_settings_check_every_field_and_keep_canonical_types():
    settings = dh.PowerSGDSettings(rank=np.int64(3), min_compression_rate=np.float32(4))
    assert type(settings.rank) is int and type(settings.min_compression_rate) is float
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 1024\], got 0"):
        dh.PowerSGDSettings(rank=0)
    with pytest.raises(ValueError, match="warm_start must be True or False, got 'False'"):
        dh.PowerSGDSettings(warm_start="False")
    with pytest.raises(ValueError, match="block_size must be an integer"):
        dh.EFSignSGDMSettings(block_size=0)
    assert dh.EFSignSGDMSettings(block_size=None).block_size is None
    assert dh.QsparseSettings(k=0.25).k == 0.25 and dh.QsparseSettings(k=7).k == 7
    with pytest.raises(ValueError, match="k must be"):
        dh.QsparseSettings(k=1.5)
    with pytest.raises(ValueError, match=r"fragments must be an integer in \[1, 4\]"):
        dh.QsparseSettings(period=4, fragments=5)  # a rule between fields
    assert dh.SparseLoCoSettings(bits=8).compressor == "topk-int8"
    with pytest.raises(ValueError, match="bits must be 2 or 8"):
        dh.SparseLoCoSettings(bits=4)
    with pytest.raises(ValueError, match="period must be at least 2 for DiLoCo"):
        dh.DiLoCoSettings(period=1)
    assert dh.LAQSettings(memory_depth=4).identity()["xi"] == 0.2  # the resolved default


def test_from_settings_builds_the_same_state_or_refuses():
    changes = {dh.EFSignSGDM: {"momentum": 0.5}, dh.LAQ: {"bits": 3}}
    for cls in ALGORITHMS:
        settings = dataclasses.replace(cls.settings_type(), **changes.get(cls, {"seed": 5}))
        state = cls.from_settings(settings)
        assert isinstance(state, cls) and state.settings == settings != cls.settings_type()
    state = dh.PowerSGD.from_settings(dh.PowerSGDSettings(rank=2), warmup_steps=3)
    assert state.settings.rank == 2 and state.warmup_steps == 3
    with pytest.raises(ValueError, match="schedule"):  # DiLoCo's constructor does not take it
        dh.DiLoCo.from_settings(dh.DiLoCoSettings(schedule="staggered"))
    with pytest.raises(TypeError, match="PowerSGDSettings"):
        dh.PowerSGD.from_settings(dh.LAQSettings())


def test_a_constructor_that_disagrees_with_its_settings_fails_when_defined():
    with pytest.raises(TypeError, match="rank"):

        class _Drifted(dh.PowerSGD):
            settings_type = dh.PowerSGDSettings

            def __init__(self, rank: int = 5) -> None:
                super().__init__(rank)

    with pytest.raises(TypeError, match="ranks"):

        class _Unknown(dh.PowerSGD):
            settings_type = dh.PowerSGDSettings

            def __init__(self, ranks: int = 4) -> None:
                super().__init__(ranks)


def test_the_baselines_have_no_settings():
    assert dh.AllReduce().settings == Settings() and dh.AllReduce().config() == {"warmup_steps": 0}
