"""What the front end costs with no model behind it: tserve serving a graph that does nothing.

    python -m bench.frontend_floor [--rounds 3]

`hollow`, built here, has bytegpt's inputs and outputs (the same request and the same ~700 KB
response: 32 x 4,096 logits and 8 presents) and computes nothing but zeros of those shapes. The
server on core 1, perf_analyzer on core 0, as bench/serve_bench.py's pinned plan, 3 interleaved
rounds of: raw ORT on hollow (its own cost), tserve serving hollow, tserve serving bytegpt, each
at concurrency 1 (p50 latency) and 16 (infer/s). Then

    front end per request   = 1 / (hollow infer/s at c=16)        (one core, everything but ORT)
    predicted bytegpt c=16  = 1 / (front end + bytegpt's raw ORT time per row at its batch)

says how much of the gap to raw ORT is the front end's (tserve's Python, grpc.aio, protobuf),
and the c=1 p50 of hollow is the latency floor of the request path and perf_analyzer itself.
Writes bench/results/frontend_floor.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from bench import perf_analyzer
from bench.serve_bench import CLIENT_CORE, RESULTS, ROOT, SERVER_CORE, measure, raw_ort
from service.launcher import ServerProcess


def hollow_graph(source: Path, out: Path) -> Path:
    """A graph with `source`'s decoder inputs and outputs whose outputs are zeros: logits
    [B, T, vocab], presents [B, heads, past + T, head_dim]."""
    model = onnx.load(str(source), load_external_data=False)
    inputs = list(model.graph.input)
    logits = next(o for o in model.graph.output if o.name == "logits")
    vocab = logits.type.tensor_type.shape.dim[2].dim_value
    pasts = [i for i in inputs if i.name.startswith("past_key_values.")]
    heads, head_dim = (pasts[0].type.tensor_type.shape.dim[k].dim_value for k in (1, 3))
    nodes, inits = (
        [],
        [
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("vocab", TensorProto.INT64, [1], [vocab]),
            helper.make_tensor("heads", TensorProto.INT64, [1], [heads]),
            helper.make_tensor("head_dim", TensorProto.INT64, [1], [head_dim]),
            helper.make_tensor("i0", TensorProto.INT64, [1], [0]),
            helper.make_tensor("i1", TensorProto.INT64, [1], [1]),
        ],
    )
    nodes += [
        helper.make_node("Shape", ["input_ids"], ["bt"]),
        helper.make_node("Gather", ["bt", "i0"], ["b"], axis=0),
        helper.make_node("Gather", ["bt", "i1"], ["t"], axis=0),
        helper.make_node("Concat", ["bt", "vocab"], ["logits_shape"], axis=0),
        helper.make_node("Expand", ["zero", "logits_shape"], ["logits"]),
        helper.make_node("Concat", ["b", "heads", "t", "head_dim"], ["new_shape"], axis=0),
        helper.make_node("Expand", ["zero", "new_shape"], ["new_kv"]),
    ]
    outputs = [logits]
    for p in pasts:
        name = p.name.replace("past_key_values.", "present.")
        nodes.append(helper.make_node("Concat", [p.name, "new_kv"], [name], axis=2))
        outputs.append(next(o for o in model.graph.output if o.name == name))
    # every input stays an input (the server validates the same request); only the pasts are read
    graph = helper.make_graph(nodes, "hollow", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = model.ir_version
    onnx.save(proto, str(out))
    return out


def response_bytes(graph: Path, length: int) -> tuple[int, int]:
    """(logits, presents) bytes of one response to a `length`-token request with no past."""
    model = onnx.load(str(graph), load_external_data=False)
    dims = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    logits = length * dims["logits"][2] * 4
    presents = sum(d[1] * length * d[3] * 4 for name, d in dims.items() if name.startswith("present."))
    return logits, presents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--length", type=int, default=32)
    args = p.parse_args()
    pa = perf_analyzer.ensure()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(args.repository / "bytegpt", repo / "bytegpt")
        (repo / "hollow" / "1").mkdir(parents=True)
        hollow = hollow_graph(repo / "bytegpt" / "1" / "model.onnx", repo / "hollow" / "1" / "model.onnx")
        shutil.copy(repo / "bytegpt" / "config.pbtxt", repo / "hollow" / "config.pbtxt")
        config = repo / "hollow" / "config.pbtxt"
        config.write_text(config.read_text().replace('name: "bytegpt"', 'name: "hollow"'))
        data = perf_analyzer.token_input_file(Path(tmp) / "input.json", args.length)
        with ServerProcess(repo, cores={SERVER_CORE}) as server:
            for k in range(args.rounds):
                r: dict = {}
                raw_hollow = raw_ort(hollow, args.length, {SERVER_CORE}, 0.6)
                raw_model = raw_ort(repo / "bytegpt" / "1" / "model.onnx", args.length, {SERVER_CORE}, 0.6)
                r["raw_hollow_p50_ms"], r["raw_model_p50_ms"] = raw_hollow[1]["p50_ms"], raw_model[1]["p50_ms"]
                for model in ("hollow", "bytegpt"):
                    for c in (1, 16):
                        point = measure(server, pa, data, model, c, args.requests, {CLIENT_CORE})
                        if "error" in point:
                            print(f"  {model} c={c}: FAILED: {point['error']}", flush=True)
                            continue
                        r[f"{model}_c{c}"] = point
                batch = round(r.get("bytegpt_c16", {}).get("mean_batch", 8))
                nearest = min(raw_model, key=lambda b: abs(b - batch))
                r["raw_model_rows_per_s_at_batch"] = raw_model[nearest]["infer_per_s"]
                rounds.append(r)
                print(
                    f"round {k + 1}: raw hollow p50 {r['raw_hollow_p50_ms']:.3f} ms, raw bytegpt p50 "
                    f"{r['raw_model_p50_ms']:.2f} ms; "
                    + ", ".join(
                        f"{m} c={c}: {r[f'{m}_c{c}']['infer_per_s']:.1f}/s p50 {r[f'{m}_c{c}']['p50_ms']:.2f} ms"
                        for m in ("hollow", "bytegpt")
                        for c in (1, 16)
                        if f"{m}_c{c}" in r
                    ),
                    flush=True,
                )

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    done = [r for r in rounds if all(f"{m}_c{c}" in r for m in ("hollow", "bytegpt") for c in (1, 16))]
    front_ms = [1e3 / r["hollow_c16"]["infer_per_s"] for r in done]
    predicted = [1 / (f / 1e3 + 1 / r["raw_model_rows_per_s_at_batch"]) for f, r in zip(front_ms, done)]
    logits, presents = response_bytes(args.repository / "bytegpt" / "1" / "model.onnx", args.length)
    print(
        f"\nresponse to a {args.length}-token request: {logits + presents:,} bytes (logits {logits:,}, "
        f"presents {presents:,})"
    )
    print(
        f"pinned: server on core {SERVER_CORE}, perf_analyzer on core {CLIENT_CORE}; median (range) over "
        f"{len(done)} rounds"
    )
    print(
        f"  hollow model, c=1 p50: {med([r['hollow_c1']['p50_ms'] for r in done])} ms "
        f"(its raw ORT p50 {med([r['raw_hollow_p50_ms'] for r in done])} ms): the request path's latency floor"
    )
    print(f"  front end per request (1 / hollow infer/s at c=16): {med(front_ms)} ms of the server's core")
    print(
        f"  bytegpt c=1 p50: {med([r['bytegpt_c1']['p50_ms'] for r in done])} ms, raw ORT p50 "
        f"{med([r['raw_model_p50_ms'] for r in done])} ms"
    )
    print(
        f"  bytegpt c=16: {med([r['bytegpt_c16']['infer_per_s'] for r in done])} infer/s served; predicted from the "
        f"front end + raw ORT at the served batch: {med(predicted)}; raw ORT alone at that batch "
        f"{med([r['raw_model_rows_per_s_at_batch'] for r in done])} rows/s"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "frontend_floor.json").write_text(
        json.dumps({"rounds": rounds, "front_end_ms": front_ms, "predicted_infer_per_s": predicted}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
