"""Limits an export declares nowhere but in its graph: the longest input a learned position table
takes (GPT-2's `wpe`, BERT's `position_embeddings`).

A plain ONNX file in Triton's layout often comes with no config.json and no
tserve.max_sequence_length; fed a longer sequence, ONNX Runtime's Gather fails mid-run. So at
load tserve reads the graph (the few fields it needs, protos/onnx_graph.proto, without the onnx
package), takes each rank-2 table gathered by anything but a token or token-type input as a
candidate, and keeps a candidate only when a probe confirms it: the model runs at that length
and fails one past it. A guess the graph suggests never limits a model by itself (a relative
position bucket table, say, also has rank 2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from service.generated import onnx_graph_pb2 as onnx_pb

log = logging.getLogger(__name__)

# ops an index passes through unchanged in value on its way to a Gather
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}
PROBE_MAX = 4096  # longer tables are not probed: a run that long costs too much memory at load


def position_tables(model_file: Path, vocab_size: int | None = None) -> list[int]:
    """Row counts of the rank-2 tables the graph gathers by position (candidates, smallest first)."""
    model = onnx_pb.ModelProto()
    model.ParseFromString(model_file.read_bytes())
    graph = model.graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    producer: dict[str, onnx_pb.NodeProto] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    shapes[node.output[0]] = list(a.t.dims)
    graph_inputs = {i.name for i in graph.input}

    def source(name: str) -> str:
        """The graph input an index tensor is, through ops that pass values on unchanged."""
        for _ in range(16):
            node = producer.get(name)
            if node is None or node.op_type not in _PASS_THROUGH or not node.input:
                break
            name = node.input[0]
        return name

    found = set()
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        dims = shapes.get(node.input[0])
        if axis != 0 or dims is None or len(dims) != 2 or dims[0] < 2:
            continue
        indices = source(node.input[1])
        if indices in graph_inputs and "position" not in indices:
            continue  # a token or token-type table
        if vocab_size and dims[0] >= vocab_size:
            continue
        found.add(int(dims[0]))
    return sorted(found)


def discover_position_limit(
    model_file: Path, vocab_size: int | None, runs_at: Callable[[int], bool], name: str
) -> int | None:
    """The longest input the graph's position table takes, confirmed by `runs_at(length)`
    (True when a run at that length succeeds); None when no candidate is confirmed."""
    try:
        candidates = position_tables(model_file, vocab_size)
    except Exception as e:  # an unreadable graph already failed to load; this is only a probe
        log.warning("model %s: could not read the graph for a position table (%s)", name, str(e)[:200])
        return None
    for rows in candidates:
        if rows > PROBE_MAX:
            log.info("model %s: position table of %d rows not probed (over %d)", name, rows, PROBE_MAX)
            continue
        if runs_at(rows) and not runs_at(rows + 1):
            log.info("model %s: inputs are limited to %d tokens, by the graph's position table", name, rows)
            return rows
    return None
