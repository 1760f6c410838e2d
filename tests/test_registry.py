"""The growth-method registry is the one place a method is defined: the operator accepts exactly
the registered methods, dispatches on their fields, and a new method needs no other code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from msgrun.config import OperatorConfig
from msgrun.errors import ConfigError
from msgrun.growth import registry
from msgrun.growth.methods import Method
from msgrun.growth.operator import GrowthOperator
from msgrun.growth.schedule import Shape
from msgrun.growth.surgery import UnitMap
from msgrun.model import ModelArgs, Transformer

CONF = Path(__file__).resolve().parent.parent / "conf" / "operator"


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_preset_names_registered_methods(preset):
    cfg = yaml.safe_load((CONF / f"{preset}.yaml").read_text())
    for dim in registry.DIMS:
        name = cfg.get(dim)
        assert name is None or name in registry.METHODS[dim], f"{preset}: operator.{dim}={name}"


def test_an_unregistered_method_is_refused_with_the_registered_ones():
    with pytest.raises(ConfigError) as e:
        GrowthOperator(OperatorConfig(name="x", hidden="copy_me"), "gpt")
    assert "operator.hidden = 'copy_me' is not a growth method for hidden" in str(e.value)
    assert ", ".join(registry.METHODS["hidden"]) in str(e.value)


def test_a_registered_method_needs_no_other_code(monkeypatch):
    """A width method defined only as a registry entry (new units are copies of unit 0, a check
    that refuses odd sizes) is accepted, checked and dispatched by the operator."""
    def check(dim, old, new, family, where, cfg):
        if new % 2:
            raise ConfigError(f"{where}: first_copy needs even sizes")

    method = Method("first_copy", ("ffn",), "new units copy unit 0", check=check,
                    unit_map=lambda dim, old, new, cfg, gen: UnitMap.from_sources(
                        torch.cat([torch.arange(old), torch.zeros(new - old, dtype=torch.long)])))
    monkeypatch.setitem(registry.REGISTRY, "first_copy", method)
    monkeypatch.setitem(registry.METHODS, "ffn", (*registry.METHODS["ffn"], "first_copy"))
    op = GrowthOperator(OperatorConfig(name="x", ffn="first_copy"), "gpt")
    args = ModelArgs(vocab_size=64, layers=2, hidden=32, heads=2, head_dim=16, ffn=48)
    model = Transformer(args, generator=torch.Generator().manual_seed(0))
    grown = op.grow(model, Shape(2, 32, 2, 64, 128), args, torch.Generator().manual_seed(0))
    fc_old, fc_new = model.blocks[0].mlp.fc.weight, grown.model.blocks[0].mlp.fc.weight
    assert fc_new.shape[0] == 64 and torch.equal(fc_new[:48], fc_old)
    assert all(torch.equal(fc_new[i], fc_old[0]) for i in range(48, 64))
    from msgrun.growth.schedule import Stage
    with pytest.raises(ConfigError, match="first_copy needs even sizes"):
        op.check(Shape(2, 32, 2, 48, 128), [Stage(0, "at_step", 1, Shape(2, 32, 2, 49, 128), ("ffn",))],
                 Shape(2, 32, 2, 49, 128))
