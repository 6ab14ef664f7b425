"""Write a model repository entry in Triton's layout.

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/model.onnx
    <repo>/<name>/<version>/manifest.json

config.pbtxt is Triton's model-configuration text format, so Triton itself could load the
entry; what Triton has no field for goes in `parameters` (tserve.*) or the manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model.transformer import GPTConfig

MANIFEST_FORMAT = "tserve.manifest/v1"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def decoder_config_pbtxt(name: str, cfg: GPTConfig, pad_token_id: int, max_batch_size: int = 32) -> str:
    H, D = cfg.n_head, cfg.head_dim
    inputs = [
        '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }',
        # filled by the server when left out: ones, positions from the mask, an empty cache
        '  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] optional: true }',
        '  { name: "position_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true }',
    ]
    outputs = [f'  {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, {cfg.vocab_size} ] }}']
    for i in range(cfg.n_layer):
        for kind in ("key", "value"):
            inputs.append(
                f'  {{ name: "past_key_values.{i}.{kind}" data_type: TYPE_FP32 dims: [ {H}, -1, {D} ] optional: true }}'
            )
            outputs.append(f'  {{ name: "present.{i}.{kind}" data_type: TYPE_FP32 dims: [ {H}, -1, {D} ] }}')
    params = {
        "tserve.vocab_size": str(cfg.vocab_size),
        "tserve.token_inputs": "input_ids",
        "tserve.max_sequence_length": str(cfg.block_size),
        # right-pad these inputs to batch different lengths; un-pad these outputs afterwards
        "tserve.pad_values": f"input_ids={pad_token_id},attention_mask=0,position_ids=0",
        "tserve.unpad_outputs": "logits",
    }
    inputs_text, outputs_text = ",\n".join(inputs), ",\n".join(outputs)
    params_text = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
version_policy: {{ latest: {{ num_versions: 1 }} }}
input [
{inputs_text}
]
output [
{outputs_text}
]
dynamic_batching {{
  preferred_batch_size: [ 8, 16, 32 ]
  max_queue_delay_microseconds: 1000
  default_queue_policy {{ max_queue_size: 512 }}
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
{params_text}
"""


def golden_record(session: ort.InferenceSession, feeds: dict[str, np.ndarray], atol: float) -> dict:
    """Inputs and the logits this graph gave for them at the last position (the distribution a
    generation reads; a wrong weight anywhere changes it), which the server compares at load."""
    (logits,) = session.run(["logits"], feeds)
    logits = logits[:, -1:]

    def tensor(a: np.ndarray) -> dict:
        dtype = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}[a.dtype]
        return {
            "datatype": dtype,
            "shape": list(a.shape),
            "data": [float(f"{x:.7g}") for x in a.ravel()] if a.dtype == np.float32 else a.ravel().tolist(),
        }

    return {
        "inputs": {k: tensor(v) for k, v in feeds.items()},
        "outputs": {"logits": tensor(logits)},
        "positions": "last",
        "atol": atol,
    }


def write_entry(
    repo: Path,
    name: str,
    onnx_file: Path,
    config_pbtxt: str,
    manifest: dict,
    version: int = 1,
    extra_files: dict[str, str | Path] | None = None,
) -> Path:
    """extra_files: name -> text (tokenizer.json) or a file to copy (model_gqa.onnx), beside model.onnx."""
    entry = repo / name
    version_dir = entry / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / "model.onnx"
    if onnx_file.resolve() != target.resolve():
        shutil.copyfile(onnx_file, target)
    (entry / "config.pbtxt").write_text(config_pbtxt)
    for old in version_dir.iterdir():  # a file an earlier export wrote and this one does not
        if old.name not in {"model.onnx", "manifest.json", *(extra_files or {})}:
            old.unlink()
    written = [target]
    for file_name, content in (extra_files or {}).items():
        if isinstance(content, Path):
            shutil.copyfile(content, version_dir / file_name)
        else:
            (version_dir / file_name).write_text(content)
        written.append(version_dir / file_name)
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": version,
        **manifest,
        "files": {f.name: {"sha256": sha256(f), "bytes": f.stat().st_size} for f in written},
    }
    (version_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return entry
