"""WeightLayout.match as a property: every corruption of a checkpoint is reported once, by name,
and an uncorrupted subset matches exactly the slots it names (tied aliases fill their slot)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flex_surgery.export import WeightLayout, WeightMismatchError

SHARED = torch.zeros(4, 3)
PROGRAM = {  # program keys with the "module." prefix; "emb" and "head" are one tied tensor
    "module.emb": SHARED, "module.head": SHARED,
    "module.a.weight": torch.zeros(3, 3), "module.a.bias": torch.zeros(3),
    "module.b.weight": torch.zeros(2, 3), "module.norm": torch.zeros(3, dtype=torch.float64),
}
LAYOUT = WeightLayout(PROGRAM, prefix="module.")
CANONICAL = {name: slot.names[0] for slot in LAYOUT.slots for name in slot.names}
CORRUPTIONS = ("drop", "rename", "reshape", "retype")


def test_layout_names_and_ties():
    assert LAYOUT.tied == [("emb", "head")]
    assert len(LAYOUT.slots) == 5
    assert LAYOUT.name_map()["a.bias"] == "module.a.bias"


@settings(max_examples=60, deadline=None)
@given(present=st.sets(st.sampled_from(LAYOUT.names)),
       corruption=st.dictionaries(st.sampled_from(LAYOUT.names), st.sampled_from(CORRUPTIONS),
                                  max_size=3),
       strict=st.booleans())
def test_every_corruption_is_reported(present, corruption, strict):
    weights = {}
    for name in present:
        slot_shape = PROGRAM["module." + name].shape
        value = torch.ones(slot_shape, dtype=PROGRAM["module." + name].dtype)
        kind = corruption.get(name)
        if kind == "drop":
            continue
        if kind == "rename":
            weights[name + "_x"] = value
        elif kind == "reshape":
            weights[name] = value.reshape(-1)[:-1]
        elif kind == "retype":
            weights[name] = value.to(torch.float16)
        else:
            weights[name] = value
    filled = {CANONICAL[n] for n in weights if n in CANONICAL}
    renamed = [n for n in weights if n not in CANONICAL]
    bad = [n for n in weights if n in CANONICAL and
           (weights[n].shape, weights[n].dtype) != (PROGRAM["module." + n].shape,
                                                    PROGRAM["module." + n].dtype)]
    missing = strict and len(filled) < len(LAYOUT.slots)
    if renamed or bad or missing:
        try:
            LAYOUT.match(weights, strict=strict)
        except WeightMismatchError as err:
            text = str(err)
            assert all(repr(n) in text for n in renamed + bad)
            assert ("missing key" in text) == missing
        else:
            raise AssertionError("corrupted weights were accepted")
    else:
        matched = LAYOUT.match(weights, strict=strict)
        assert {slot.names[0] for slot, _ in matched} == filled
