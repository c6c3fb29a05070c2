"""The arithmetic rules of calculator.proto, without a server."""

import math
import sys

import grpc
import pytest

from calcsvc.calculator import Faults, OperationRefusedError, evaluate

BIG = sys.float_info.max
TINY = sys.float_info.min


@pytest.mark.parametrize(
    ("method", "a", "b", "expected"),
    [
        ("Add", 5, 3, 8),
        ("Subtract", 5, 3, 2),
        ("Multiply", 5, 3, 15),
        ("Divide", 5, 4, 1.25),
        ("Add", -0.0, -0.0, -0.0),
        ("Divide", 1, -BIG, -1 / BIG),
        ("Multiply", TINY, 0.5, TINY / 2),  # subnormal results are answers
        ("Subtract", BIG, BIG, 0.0),
    ],
)
def test_evaluate_answers_finite_results(method, a, b, expected):
    result = evaluate(method, a, b)
    assert result == expected
    assert math.copysign(1, result) == math.copysign(1, expected)


@pytest.mark.parametrize("method", ["Add", "Subtract", "Multiply", "Divide"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["a", "b"])
def test_non_finite_operands_are_invalid_and_named(method, bad, field):
    operands = {"a": 1.0, "b": 1.0, field: bad}
    with pytest.raises(OperationRefusedError) as refused:
        evaluate(method, operands["a"], operands["b"])
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert f"operand {field} " in refused.value.message


@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_division_by_zero_is_invalid(zero):
    with pytest.raises(OperationRefusedError) as refused:
        evaluate("Divide", 1.0, zero)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "zero" in refused.value.message


@pytest.mark.parametrize(
    ("method", "a", "b"),
    [
        ("Add", BIG, BIG),
        ("Subtract", -BIG, BIG),
        ("Multiply", BIG, 2),
        ("Divide", BIG, 0.5),
    ],
)
def test_overflow_is_out_of_range(method, a, b):
    with pytest.raises(OperationRefusedError) as refused:
        evaluate(method, a, b)
    assert refused.value.code is grpc.StatusCode.OUT_OF_RANGE


@pytest.mark.parametrize(
    ("latency", "error_rate"), [(-0.001, 0.0), (0.0, -0.1), (0.0, 1.5)]
)
def test_faults_refuse_settings_that_cannot_work(latency, error_rate):
    with pytest.raises(ValueError, match="must"):
        Faults(latency, error_rate)
