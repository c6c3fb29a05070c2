"""Every operation on every double, checked against Python's own arithmetic.

The server must answer exactly what Python computes, bit for bit (signed
zeros and subnormal results included), or refuse with the status
calculator.proto gives: INVALID_ARGUMENT for a NaN or infinite operand and
for a zero divisor, OUT_OF_RANGE for a result that overflows.
"""

from __future__ import annotations

import math
import struct
import sys

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from calcsvc._generated.calc.v1 import calculator_pb2, calculator_pb2_grpc
from calcsvc.calculator import OPERATIONS

BIG = sys.float_info.max
TINY = sys.float_info.min  # the smallest normal double
SUBNORMAL = 5e-324


@pytest.fixture(scope="module", params=["threaded", "aio"])
def server_flags(request):
    return ["--aio"] if request.param == "aio" else []


@pytest.fixture(scope="module")
def stub(shared_server):
    with grpc.insecure_channel(shared_server.target) as channel:
        yield calculator_pb2_grpc.CalculatorStub(channel)


def bits(value):
    return struct.pack("<d", value)


def expected(method, a, b):
    """Return the result the contract gives, or the status code it refuses with."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if method == "Divide" and b == 0:
        return grpc.StatusCode.INVALID_ARGUMENT
    try:
        result = OPERATIONS[method](a, b)
    except OverflowError:
        return grpc.StatusCode.OUT_OF_RANGE
    return result if math.isfinite(result) else grpc.StatusCode.OUT_OF_RANGE


@settings(
    max_examples=500,
    deadline=None,
    database=None,
    # The shared server outlives each example on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    method=st.sampled_from(sorted(OPERATIONS)),
    a=st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    b=st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
)
@example(method="Add", a=-0.0, b=-0.0)
@example(method="Subtract", a=0.0, b=0.0)
@example(method="Multiply", a=-0.0, b=5.0)
@example(method="Divide", a=-1.0, b=math.inf)
@example(method="Divide", a=1.0, b=-0.0)
@example(method="Multiply", a=TINY, b=0.5)
@example(method="Divide", a=SUBNORMAL, b=2.0)
@example(method="Multiply", a=BIG, b=2.0)
@example(method="Divide", a=BIG, b=0.5)
@example(method="Subtract", a=-BIG, b=BIG)
@example(method="Add", a=math.nan, b=1.0)
@example(method="Divide", a=-math.nan, b=0.0)
def test_every_answer_is_pythons_or_the_documented_status(stub, method, a, b):
    want = expected(method, a, b)
    request = calculator_pb2.BinaryRequest(a=a, b=b)
    call = getattr(stub, method)
    if isinstance(want, grpc.StatusCode):
        with pytest.raises(grpc.RpcError) as refused:
            call(request, timeout=5)
        assert refused.value.code() is want, refused.value.details()
        assert "Traceback" not in (refused.value.details() or "")
    else:
        got = call(request, timeout=5).value
        assert bits(got) == bits(want), (got, want)
