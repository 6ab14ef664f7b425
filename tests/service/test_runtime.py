"""ONNX Runtime's exceptions become domain errors in one place, in-process."""

from __future__ import annotations

import pytest
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from service.errors import InternalError, InvalidInput, OutOfMemory
from service.runtime import classify

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit


@pytest.mark.parametrize(
    "error, kind",
    [
        (
            ort_state.InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input data type"),
            InvalidInput,
        ),
        (
            ort_state.RuntimeException("RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer of size 9"),
            OutOfMemory,
        ),
        (MemoryError(), OutOfMemory),
        (
            ort_state.Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Gather"),
            InternalError,
        ),
    ],
)
def test_ort_errors_are_classified(error, kind):
    assert type(classify(error)) is kind
