"""The family adapter interface: every registered family satisfies the Protocol, and detection order is explicit."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from flowmap_convert.adapters import DETECTION_ORDER, FAMILIES, Family, FamilyAdapter, LoadOptions, load_source

from flowmap_convert import adapters

MEMBERS = ("detect", "build", "hint", "accepts", "claims_dir", "build_dir", "claims_layout")


def test_every_registered_family_satisfies_the_protocol_with_its_signatures():
    assert FAMILIES, "no family registered"
    for name, fam in FAMILIES.items():
        assert isinstance(fam, FamilyAdapter), name
        assert fam.name == name and isinstance(fam.tie_winner, bool)
        for member in MEMBERS:  # same parameters as the Protocol (names and count), so callers need no probing
            want = list(inspect.signature(getattr(FamilyAdapter, member)).parameters)[1:]
            got = list(inspect.signature(getattr(fam, member)).parameters)
            assert got == want, f"{name}.{member}{tuple(got)} differs from the Protocol's {tuple(want)}"


def test_detection_order_names_exactly_the_registered_families_once():
    assert len(set(DETECTION_ORDER)) == len(DETECTION_ORDER)
    assert set(DETECTION_ORDER) == set(FAMILIES)


def test_register_refuses_an_incomplete_adapter_or_one_missing_from_the_order(monkeypatch):
    monkeypatch.setattr(adapters, "FAMILIES", dict(FAMILIES))
    monkeypatch.setattr(adapters, "DETECTION_ORDER", (*DETECTION_ORDER, "toy"))

    class NoBuild(Family):
        def detect(self, sd):
            return False

    with pytest.raises(TypeError, match="lacks build"):
        adapters.register("toy")(NoBuild)

    class Toy(Family):
        def detect(self, sd):
            return False

        def build(self, sd, options):
            raise AssertionError

    with pytest.raises(TypeError, match="DETECTION_ORDER"):
        adapters.register("unlisted")(Toy)
    adapters.register("toy")(Toy)
    toy = adapters.FAMILIES["toy"]
    assert isinstance(toy, FamilyAdapter) and toy.name == "toy"
    assert not toy.hint({}) and not toy.accepts({}) and toy.claims_layout(["a"]) is None  # the defaults


def test_load_options_are_frozen_and_unknown_names_are_refused(tmp_path):
    opts = LoadOptions(num_heads=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.num_heads = 8
    with pytest.raises(TypeError, match="num_head"):
        load_source(str(tmp_path / "missing.pt"), num_head=4)
