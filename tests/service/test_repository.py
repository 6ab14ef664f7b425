"""Model configuration parameters read from config.pbtxt, in-process."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from service.errors import ModelLoadError
from service.generated import model_config_pb2 as mc
from service.repository import runtime_options

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit


def config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def test_thread_counts_come_from_triton_parameters():
    opts = runtime_options(
        config(
            'parameters { key: "intra_op_thread_count" value: { string_value: "3" } }\ninstance_group [ { count: 2 } ]'
        )
    )
    assert (opts.instances, opts.intra_op_threads, opts.inter_op_threads) == (2, 3, None)


@pytest.mark.parametrize("value, message", [("two", "must be an integer"), ("0", "must be at least 1")])
def test_bad_thread_counts_name_the_parameter(value, message):
    with pytest.raises(ModelLoadError, match=f"intra_op_thread_count {message}"):
        runtime_options(config(f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{value}" }} }}'))
