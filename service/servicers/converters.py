"""All protobuf <-> domain conversion for the inference service.

Decoding checks what only the wire can tell: datatypes, non-negative shapes, and that the
bytes (raw_input_contents) or typed contents hold exactly shape x datatype, before anything
is allocated from a client-supplied shape.
"""

from __future__ import annotations

import json
import math

import numpy as np

from service.errors import InvalidInput, short
from service.generated import generation_pb2 as gen
from service.generated import grpc_service_pb2 as pb
from service.generation.grammar import Constraint
from service.generation.requests import GenerateInput
from service.generation.sequence import Event, FinishReason
from service.models import ModelVersion
from service.stats import Duration
from service.tasks.tensors import TASK_PARAMETERS
from service.types import BYTES, DATATYPES, InferRequest, InferResponse
from service.wire import (
    array_from_bytes,
    check_tensor_header,
    datatype_of,
    refuse_unsupported,
    strings,
    strings_to_bytes,
)

# typed `contents` field per datatype (FP16 and BF16 travel as raw bytes only, as in Triton)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def infer_request_from_proto(req: pb.ModelInferRequest) -> InferRequest:
    refuse_unsupported(req.parameters, "the request")
    for t in req.inputs:
        refuse_unsupported(t.parameters, f"input {short(t.name)}")
    for o in req.outputs:
        refuse_unsupported(o.parameters, f"output {short(o.name)}")
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(req.inputs):
        name = t.name
        if name in inputs:
            raise InvalidInput(f"input {short(name)} appears twice")
        shape = list(t.shape)
        if raw:
            if t.HasField("contents"):
                raise InvalidInput(f"input {short(name)} has both raw_input_contents and contents")
            inputs[name] = array_from_bytes(name, t.datatype, shape, raw[i], "raw_input_contents")
            continue
        dtype = check_tensor_header(name, t.datatype, shape)
        if t.datatype == BYTES:
            values, count = t.contents.bytes_contents, math.prod(shape)
            if len(values) != count:
                raise InvalidInput(
                    f"input {short(name)}: contents.bytes_contents holds {len(values)} values; shape {shape[:8]} "
                    f"needs {count}"
                )
            inputs[name] = strings(list(values), shape)
            continue
        field = CONTENTS_FIELD.get(t.datatype)
        if field is None:
            raise InvalidInput(f"input {short(name)}: datatype {t.datatype} must be sent in raw_input_contents")
        values, count = getattr(t.contents, field), math.prod(shape)
        if len(values) != count:
            raise InvalidInput(
                f"input {short(name)}: contents.{field} holds {len(values)} values; shape {shape[:8]} needs {count}"
            )
        inputs[name] = np.array(values, dtype=dtype).reshape(shape).astype(DATATYPES[t.datatype], copy=False)
    return InferRequest(
        model_name=req.model_name,
        model_version=req.model_version,
        id=req.id,
        inputs=inputs,
        requested_outputs=tuple(o.name for o in req.outputs),
        parameters={k: _parameter(v) for k, v in req.parameters.items() if k in TASK_PARAMETERS},
    )


def _parameter(p: pb.InferParameter):
    return getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None


def infer_response_to_proto(res: InferResponse, order: tuple[str, ...] = ()) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=res.model_name, model_version=res.model_version, id=res.id)
    for name in order or tuple(res.outputs):
        array = np.ascontiguousarray(res.outputs[name])
        datatype = datatype_of(array)
        out.outputs.add(name=name, datatype=datatype, shape=array.shape)
        out.raw_output_contents.append(strings_to_bytes(array) if datatype == BYTES else array.tobytes())
    return out


def model_metadata_to_proto(mv: ModelVersion, versions: list[int]) -> pb.ModelMetadataResponse:
    spec = mv.spec
    batch = [-1] if spec.max_batch_size else []
    res = pb.ModelMetadataResponse(name=mv.name, versions=[str(v) for v in versions], platform=spec.platform)
    for t in spec.inputs:
        res.inputs.add(name=t.name, datatype=t.datatype, shape=batch + list(t.dims))
    for t in spec.outputs:
        res.outputs.add(name=t.name, datatype=t.datatype, shape=batch + list(t.dims))
    return res


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def statistics_to_proto(models: list[ModelVersion]) -> pb.ModelStatisticsResponse:
    res = pb.ModelStatisticsResponse()
    for mv in models:
        s = mv.observer.stats
        entry = res.model_stats.add(
            name=mv.name,
            version=str(mv.version),
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
        )
        st = entry.inference_stats
        st.success.CopyFrom(_duration(s.success))
        st.fail.CopyFrom(_duration(s.fail))
        st.queue.CopyFrom(_duration(s.queue))
        st.compute_infer.CopyFrom(_duration(s.compute_infer))
        # input/output conversion happens outside the batch run; counted with zero time
        st.compute_input.CopyFrom(pb.StatisticDuration(count=s.compute_infer.count))
        st.compute_output.CopyFrom(pb.StatisticDuration(count=s.compute_infer.count))
        for size, bs in sorted(s.by_batch_size.items()):
            entry.batch_stats.add(batch_size=size, compute_infer=_duration(bs.compute_infer))
    return res


def repository_index_to_proto(models: list[ModelVersion], ready_only: bool) -> pb.RepositoryIndexResponse:
    res = pb.RepositoryIndexResponse()
    for mv in models:
        if ready_only and not mv.ready:
            continue
        res.models.add(
            name=mv.name, version=str(mv.version) if mv.version else "", state=mv.state.value, reason=mv.reason
        )
    return res


FINISH = {
    FinishReason.LENGTH: gen.FINISH_REASON_LENGTH,
    FinishReason.STOP: gen.FINISH_REASON_STOP,
    FinishReason.EOS: gen.FINISH_REASON_EOS,
    FinishReason.CANCELLED: gen.FINISH_REASON_CANCELLED,
}


def generate_input_from_proto(req: gen.GenerateRequest) -> GenerateInput:
    s = req.sampling
    which = req.WhichOneof("prompt")
    return GenerateInput(
        model=req.model,
        text=req.text if which == "text" else None,
        token_ids=list(req.token_ids.ids) if which == "token_ids" else None,
        max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        seed=s.seed if s.HasField("seed") else None,
        stop=list(req.stop),
        request_id=req.request_id,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        min_p=s.min_p if s.HasField("min_p") else None,
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else None,
        frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
        logit_bias=dict(s.logit_bias) or None,
        logprobs=req.logprobs if req.HasField("logprobs") else None,
        prompt_logprobs=req.prompt_logprobs if req.HasField("prompt_logprobs") else None,
        constraint=_constraint(req.structured_output) if req.HasField("structured_output") else None,
        n=req.n if req.HasField("n") else 1,
    )


def _constraint(so: gen.StructuredOutput) -> Constraint | None:
    kind = so.WhichOneof("kind")
    where = f"structured_output.{kind}"
    if kind is None or (kind == "json_object" and not so.json_object):
        return None
    if kind == "json_schema":
        try:
            return Constraint("json_schema", json.loads(so.json_schema), where)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{where}: not JSON ({e})") from None
    if kind == "choice":
        return Constraint("choice", list(so.choice.choices), where)
    return Constraint(kind, None if kind == "json_object" else getattr(so, kind), where)


def _logprobs(records) -> list[gen.TokenLogprob]:
    return [
        gen.TokenLogprob(
            token_id=r.token,
            top=[gen.TopLogprob(token_id=t, logprob=lp) for t, lp in r.top],
            **({} if r.logprob is None else {"logprob": r.logprob}),
        )
        for r in records
    ]


def _logprob_fields(events: list[Event]) -> dict:
    fields = {}
    records = [r for e in events for r in e.logprobs]
    if records:
        fields["logprobs"] = _logprobs(records)
    prompt = next((e.prompt_logprobs for e in events if e.prompt_logprobs), None)
    if prompt:
        fields["prompt_logprobs"] = _logprobs(prompt)
    return fields


def _finish_fields(event: Event) -> dict:
    return {
        "finish_reason": FINISH[event.finish_reason],
        "usage": gen.Usage(prompt_tokens=event.prompt_tokens, generated_tokens=event.generated_tokens),
        "timings": gen.Timings(
            queue_seconds=event.queue_s, time_to_first_token_seconds=event.ttft_s, total_seconds=event.total_s
        ),
    }


def _by_choice(events: list[Event]) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = {}
    for e in sorted(events, key=lambda e: e.index):
        out.setdefault(e.index, []).append(e)
    return out


def stream_chunk_to_proto(events: list[Event]) -> list[gen.GenerateStreamResponse]:
    """A chunk of events -> one message per choice in it."""
    messages = []
    for index, evs in _by_choice(events).items():
        last = evs[-1]
        extra = _finish_fields(last) if last.finish_reason else {}
        messages.append(
            gen.GenerateStreamResponse(
                text="".join(e.text for e in evs),
                token_ids=[t for e in evs for t in e.token_ids],
                index=index,
                **extra,
                **_logprob_fields(evs),
            )
        )
    return messages


def generate_response_to_proto(model: str, request_id: str, events: list[Event]) -> gen.GenerateResponse:
    choices = _by_choice(events)
    first = choices[0]
    finals = [e for e in events if e.finish_reason is not None]
    fields = _finish_fields(first[-1])
    generated = sum(e.generated_tokens for e in finals)
    fields["usage"] = gen.Usage(prompt_tokens=first[-1].prompt_tokens, generated_tokens=generated)
    res = gen.GenerateResponse(
        model=model,
        request_id=request_id,
        text="".join(e.text for e in first),
        token_ids=[t for e in first for t in e.token_ids],
        **fields,
        **_logprob_fields(first),
    )
    if len(choices) > 1:
        for index, evs in choices.items():
            res.choices.add(
                index=index,
                text="".join(e.text for e in evs),
                token_ids=[t for e in evs for t in e.token_ids],
                finish_reason=FINISH[evs[-1].finish_reason],
                logprobs=_logprobs([r for e in evs for r in e.logprobs]),
            )
    return res
