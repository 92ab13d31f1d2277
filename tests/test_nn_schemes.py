"""Scheme dataclasses: defaults, validation messages, dict round trip, shape checks."""

import dataclasses

import pytest

from qkernels.nn.schemes import (
    SCHEMES,
    Fp4,
    Fp8Dynamic,
    Fp8WeightOnly,
    Int4WeightOnly,
    Int8Dynamic,
    Int8DynamicInt4Weight,
    Int8WeightOnly,
    IntWeightInt8Act,
    Scheme,
)


def test_defaults_and_frozen():
    s = Int4WeightOnly()
    assert (s.group_size, s.symmetric) == (128, False)
    assert Fp8Dynamic().granularity == "row" and Fp4().format == "nvfp4"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.group_size = 64


@pytest.mark.parametrize("make, match", [
    (lambda: Int4WeightOnly(group_size=0), r"Int4WeightOnly\.group_size must be a positive int or -1.*got 0"),
    (lambda: Int4WeightOnly(group_size=12.5), r"group_size.*got 12\.5"),
    (lambda: Int4WeightOnly(group_size=True), r"group_size.*got True"),
    (lambda: Int4WeightOnly(symmetric="yes"), r"Int4WeightOnly\.symmetric must be a bool, got 'yes'"),
    (lambda: Int8WeightOnly(group_size=-2), r"Int8WeightOnly\.group_size.*got -2"),
    (lambda: Fp8Dynamic(granularity="col"),
     r"Fp8Dynamic\.granularity must be one of \('row', 'tensor', 'block'\), got 'col'"),
    (lambda: Fp4(format="fp4"), r"Fp4\.format must be one of \('mxfp4', 'nvfp4'\), got 'fp4'"),
    (lambda: Fp4(weight_only=1), r"Fp4\.weight_only must be a bool, got 1"),
])
def test_bad_fields(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_field():
    with pytest.raises(TypeError, match="unexpected keyword argument 'nbits'"):
        Int4WeightOnly(nbits=4)
    with pytest.raises(ValueError, match=r"Int4WeightOnly has no field\(s\) \['nbits'\]"):
        Scheme.from_dict({"scheme": "int4_weight_only", "nbits": 4})
    with pytest.raises(ValueError, match=r"Int4WeightOnly\.bits must be one of \(2, 3, 4\), got 8"):
        Int4WeightOnly(bits=8)
    with pytest.raises(ValueError, match=r"IntWeightInt8Act\.bits must be one of .*got 1"):
        IntWeightInt8Act(bits=1)
    # configs saved before the bits field load as 4-bit; the repr of a 4-bit scheme is unchanged
    assert Scheme.from_dict({"scheme": "int4_weight_only", "group_size": 32, "symmetric": True}) == \
        Int4WeightOnly(32, True, 4)
    assert repr(Int4WeightOnly(32)) == "Int4WeightOnly(group_size=32, symmetric=False)"
    assert repr(Int4WeightOnly(32, bits=3)) == "Int4WeightOnly(group_size=32, symmetric=False, bits=3)"
    with pytest.raises(ValueError, match=r"scheme must be one of .*got 'int3'"):
        Scheme.from_dict({"scheme": "int3"})
    with pytest.raises(ValueError, match="'scheme' key"):
        Scheme.from_dict({"group_size": 4})


@pytest.mark.parametrize("s", [Int4WeightOnly(32, True), Int4WeightOnly(64, bits=3), IntWeightInt8Act(4, 32),
                               IntWeightInt8Act(8, -1, True), Int8DynamicInt4Weight(64), Int8WeightOnly(), Int8WeightOnly(64, False), Int8Dynamic(),
                               Fp8WeightOnly(), Fp8Dynamic("block"), Fp4("mxfp4"),
                               Fp4("nvfp4", weight_only=True)])
def test_dict_round_trip(s):
    assert Scheme.from_dict(s.to_dict()) == s
    assert s.name in SCHEMES


def test_check_shape():
    assert Int4WeightOnly(128).check_shape(256, 8) is None
    assert Int4WeightOnly(128).check_shape(576, 8) is None  # ragged last group (SmolLM2-135M's K)
    assert Int4WeightOnly(128).check_shape(201, 8) is None  # padded to 256 columns
    assert "padded to whole groups of 3 (9) is odd" in Int4WeightOnly(3).check_shape(7, 8)
    assert IntWeightInt8Act(8, 3).check_shape(7, 8) is None  # int8 storage: no packing constraint
    assert "odd" in Int4WeightOnly(-1).check_shape(33, 8)
    assert Int4WeightOnly(-1).check_shape(34, 8) is None
    assert Int8WeightOnly(64).check_shape(96, 8) is None
    assert Int8Dynamic().check_shape(3, 5) is None
    assert "block size 32" in Fp4("mxfp4").check_shape(48, 8)
    assert "divisible by 128" in Fp8Dynamic("block").check_shape(128, 64)
    assert "empty" in Int8WeightOnly().check_shape(0, 4)
