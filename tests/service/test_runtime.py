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
            # a sound session failing on a run: the input's fault (re-run apart first by the batcher)
            ort_state.Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Gather"),
            InvalidInput,
        ),
        (
            ort_state.RuntimeException(
                "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Add node. "
                "Attempting to broadcast an axis by a dimension other than 1. 64 by 70"
            ),
            InvalidInput,
        ),
        (ort_state.EPFail("[ONNXRuntimeError] : 11 : EP_FAIL : CUDA failure 700"), InternalError),
        # the device failed, whatever code ORT gave it: no 400 for a poisoned CUDA context
        (
            ort_state.Fail(
                "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: an illegal memory access was encountered"
            ),
            InternalError,
        ),
        (ValueError("a bug of ours"), InternalError),
    ],
)
def test_ort_errors_are_classified(error, kind):
    assert type(classify(error)) is kind


def test_the_input_error_carries_ort_words_without_its_status_prefix():
    error = classify(
        ort_state.InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : indices element out of data bounds")
    )
    assert error.message == "the model cannot run on this input: ONNX Runtime says indices element out of data bounds"
