"""Encoder-decoder checkpoint -> ONNX in Optimum's seq2seq layout, so that tserve's own model and
a user's Optimum export (T5, BART, Marian) take the same road through the server.

    encoder_model.onnx            input_ids, attention_mask [B, S] -> last_hidden_state [B, S, C]
    decoder_model.onnx            input_ids [B, T], encoder_hidden_states [B, S, C], encoder_attention_mask [B, S]
                                  -> logits [B, T, V], present.{i}.decoder.key|value [B, H, T, D],
                                     present.{i}.encoder.key|value [B, H, S, D]
    decoder_with_past_model.onnx  input_ids [B, T], encoder_attention_mask [B, S], decoder_attention_mask
                                  [B, P + T], past_key_values.{i}.decoder.key|value [B, H, P, D],
                                  past_key_values.{i}.encoder.key|value [B, H, S, D]
                                  -> logits, present.{i}.decoder.key|value [B, H, P + T, D]

`decoder_attention_mask` is the one input beyond Optimum's: with it, sequences of different
target lengths share a decode batch (left-padded self-attention caches), which is what
continuous batching needs.

    python -m export.seq2seq --checkpoint runs/naming/checkpoint.pt --repository model_repository
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.onnx_export import ONNX_IR_VERSION, ONNX_OPSET
from export.repository import sha256
from model.seq2seq import BOS_ID, EOS_ID, PAD_ID, Seq2Seq, load_seq2seq
from model.train_seq2seq import NamingTokenizer

ENCODER, DECODER, DECODER_WITH_PAST = "encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"


def _kv_names(prefix: str, n_layer: int, kinds: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.{i}.{kind}.{t}" for i in range(n_layer) for kind in kinds for t in ("key", "value")]


class _Encoder(nn.Module):
    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(input_ids, attention_mask)


class _Decoder(nn.Module):
    """The first pass: cross-attention from the encoder's output; presents of both kinds."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask):
        logits, presents, crosses = self.model.decode(input_ids, encoder_attention_mask, encoder_hidden_states)
        out = [logits]
        for (k, v), (ck, cv) in zip(presents, crosses):
            out += [k, v, ck, cv]
        return tuple(out)


class _DecoderWithPast(nn.Module):
    """Every later pass: both caches in, the grown self-attention cache out."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, encoder_attention_mask, decoder_attention_mask, past_key_values):
        n = len(past_key_values) // 4
        past = [(past_key_values[4 * i], past_key_values[4 * i + 1]) for i in range(n)]
        cross = [(past_key_values[4 * i + 2], past_key_values[4 * i + 3]) for i in range(n)]
        logits, presents, _ = self.model.decode(
            input_ids, encoder_attention_mask, past=past, cross=cross, decoder_attention_mask=decoder_attention_mask
        )
        return (logits, *[t for kv in presents for t in kv])


class _DecoderWithPastNoMask(_DecoderWithPast):
    """Optimum's exact inputs (no decoder_attention_mask), for testing that road through the server."""

    def forward(self, input_ids, encoder_attention_mask, past_key_values):
        return super().forward(input_ids, encoder_attention_mask, None, past_key_values)


def _save(program, path: Path, doc: str) -> None:
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, ONNX_IR_VERSION)
    proto.doc_string = doc
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_seq2seq(model: Seq2Seq, folder: Path, decoder_attention_mask: bool = True) -> list[Path]:
    """The three graphs into `folder`; dynamic batch, source, target and past axes. Without
    decoder_attention_mask, decoder_with_past has exactly Optimum's inputs."""
    cfg = model.cfg
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    L, H, D, C = cfg.n_decoder_layers, cfg.n_head, cfg.head_dim, cfg.d_model
    B, S, T, P = 2, 5, 3, 4  # torch.export specializes sizes 0 and 1: examples use sizes >= 2
    batch = torch.export.Dim("batch", max=1024)
    src = torch.export.Dim("source", max=cfg.max_source)
    tgt = torch.export.Dim("target", max=cfg.max_target)
    past = torch.export.Dim("past", min=0, max=cfg.max_target)
    total = torch.export.Dim("total", max=2 * cfg.max_target)
    ids = torch.randint(0, 256, (B, S))
    mask = torch.ones(B, S, dtype=torch.int64)
    doc = f"encoder-decoder Transformer, {cfg.n_encoder_layers}+{cfg.n_decoder_layers} layers, d_model {C}"
    common = {"dynamo": True, "opset_version": ONNX_OPSET, "optimize": True, "verbose": False}

    program = torch.onnx.export(
        _Encoder(model).eval(),
        (ids, mask),
        dynamic_shapes={"input_ids": {0: batch, 1: src}, "attention_mask": {0: batch, 1: src}},
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        **common,
    )
    _save(program, folder / ENCODER, doc + ": encoder")

    hidden = torch.randn(B, S, C)
    program = torch.onnx.export(
        _Decoder(model).eval(),
        (torch.randint(0, 256, (B, T)), hidden, mask),
        dynamic_shapes={
            "input_ids": {0: batch, 1: tgt},
            "encoder_hidden_states": {0: batch, 1: src},
            "encoder_attention_mask": {0: batch, 1: src},
        },
        input_names=["input_ids", "encoder_hidden_states", "encoder_attention_mask"],
        output_names=["logits", *_kv_names("present", L, ("decoder", "encoder"))],
        **common,
    )
    _save(program, folder / DECODER, doc + ": decoder, first pass")

    kv = []
    for _ in range(L):
        kv += [torch.randn(B, H, P, D), torch.randn(B, H, P, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)]
    past_shapes = tuple({0: batch, 2: past if j % 4 < 2 else src} for j in range(4 * L))
    past_names = _kv_names("past_key_values", L, ("decoder", "encoder"))
    if decoder_attention_mask:
        module, args = (
            _DecoderWithPast(model),
            (torch.randint(0, 256, (B, T)), mask, torch.ones(B, P + T, dtype=torch.int64), tuple(kv)),
        )
        shapes = {
            "input_ids": {0: batch, 1: tgt},
            "encoder_attention_mask": {0: batch, 1: src},
            "decoder_attention_mask": {0: batch, 1: total},
            "past_key_values": past_shapes,
        }
        names = ["input_ids", "encoder_attention_mask", "decoder_attention_mask", *past_names]
    else:
        module, args = _DecoderWithPastNoMask(model), (torch.randint(0, 256, (B, T)), mask, tuple(kv))
        shapes = {
            "input_ids": {0: batch, 1: tgt},
            "encoder_attention_mask": {0: batch, 1: src},
            "past_key_values": past_shapes,
        }
        names = ["input_ids", "encoder_attention_mask", *past_names]
    program = torch.onnx.export(
        module.eval(),
        args,
        dynamic_shapes=shapes,
        input_names=names,
        output_names=["logits", *_kv_names("present", L, ("decoder",))],
        **common,
    )
    _save(program, folder / DECODER_WITH_PAST, doc + ": decoder with past")
    return [folder / n for n in (ENCODER, DECODER, DECODER_WITH_PAST)]


def onnx_greedy(
    folder: Path,
    sources: list[list[int]],
    max_new_tokens: int,
    sessions: tuple[ort.InferenceSession, ...] | None = None,
) -> list[list[int]]:
    """Greedy decoding through the three graphs, a right-padded batch at once: the reference the
    server's engine is compared with, and itself compared with PyTorch."""
    enc, dec, dwp = sessions or load_sessions(folder)
    pad_id, bos_id, eos_id = special_ids(folder)
    width = max(len(s) for s in sources)
    ids = np.full((len(sources), width), pad_id, np.int64)
    mask = np.zeros((len(sources), width), np.int64)
    for i, s in enumerate(sources):
        ids[i, : len(s)], mask[i, : len(s)] = list(s), 1
    hidden = enc.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    B = len(sources)
    outs = dec.run(
        None,
        {
            "input_ids": np.full((B, 1), bos_id, np.int64),
            "encoder_hidden_states": hidden,
            "encoder_attention_mask": mask,
        },
    )
    names = [o.name for o in dec.get_outputs()]
    cache = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], outs[1:])}
    logits, result, done = outs[0], [[] for _ in range(B)], [False] * B
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        for b in range(B):
            if not done[b]:
                done[b] = int(nxt[b]) == eos_id
                if not done[b]:
                    result[b].append(int(nxt[b]))
        if all(done):
            break
        feeds = {"input_ids": nxt[:, None].astype(np.int64), "encoder_attention_mask": mask, **cache}
        if "decoder_attention_mask" in {i.name for i in dwp.get_inputs()}:
            feeds["decoder_attention_mask"] = np.ones((B, step + 2), np.int64)
        outs = dwp.run(None, feeds)
        logits = outs[0]
        for n, v in zip([o.name for o in dwp.get_outputs()][1:], outs[1:]):
            cache[n.replace("present", "past_key_values")] = v
    return result


def special_ids(folder: Path) -> tuple[int, int, int]:
    """(pad, decoder start, end) from the folder's config.json; the byte model's without one."""
    path = folder / "config.json"
    if not path.is_file():
        return PAD_ID, BOS_ID, EOS_ID
    config = json.loads(path.read_text())
    return config["pad_token_id"], config["decoder_start_token_id"], config["eos_token_id"]


def load_sessions(folder: Path) -> tuple[ort.InferenceSession, ...]:
    return tuple(
        ort.InferenceSession(str(folder / n), providers=["CPUExecutionProvider"])
        for n in (ENCODER, DECODER, DECODER_WITH_PAST)
    )


def export_entry(
    checkpoint: Path, repository: Path, name: str = "namegen", samples: int = 8, decoder_attention_mask: bool = True
) -> Path:
    """An Optimum-layout folder as a repository entry: <repo>/<name>/1/ with the three graphs,
    config.json, generation_config.json and a manifest (tokenizer, metrics, parity, sha256)."""
    model, ckpt = load_seq2seq(str(checkpoint))
    cfg = model.cfg
    tok = NamingTokenizer.from_checkpoint(ckpt)
    version = repository / name / "1"
    with tempfile.TemporaryDirectory() as tmp:
        files = export_seq2seq(model, Path(tmp), decoder_attention_mask)
        (Path(tmp) / "config.json").write_text(
            json.dumps(
                {
                    "model_type": "tserve-seq2seq",
                    "is_encoder_decoder": True,
                    "architectures": ["Seq2Seq"],
                    "vocab_size": cfg.vocab_size,
                    "d_model": cfg.d_model,
                    "encoder_layers": cfg.n_encoder_layers,
                    "decoder_layers": cfg.n_decoder_layers,
                    "num_attention_heads": cfg.n_head,
                    "max_position_embeddings": cfg.max_source,
                    "pad_token_id": cfg.pad_id,
                    "bos_token_id": cfg.bos_id,
                    "eos_token_id": cfg.eos_id,
                    "decoder_start_token_id": cfg.bos_id,
                },
                indent=2,
            )
            + "\n"
        )
        (Path(tmp) / "generation_config.json").write_text(
            json.dumps(
                {
                    "decoder_start_token_id": cfg.bos_id,
                    "eos_token_id": cfg.eos_id,
                    "pad_token_id": cfg.pad_id,
                    "max_length": cfg.max_target,
                },
                indent=2,
            )
            + "\n"
        )
        files += [Path(tmp) / "config.json", Path(tmp) / "generation_config.json"]
        if tok.to_str() is not None:  # a BPE: the server reads it as any export's tokenizer.json
            (Path(tmp) / "tokenizer.json").write_text(tok.to_str())
            files.append(Path(tmp) / "tokenizer.json")
        examples = [tok.encode(s["source"])[: cfg.max_source] for s in ckpt["metrics"].get("samples", [])][
            :samples
        ] or [tok.encode("def _(self):\n    return self._items.pop()")]
        got = onnx_greedy(Path(tmp), examples, cfg.max_target - 2)
        want = [
            model.generate(torch.tensor([list(s)]), torch.ones(1, len(s), dtype=torch.int64), cfg.max_target - 2)[0]
            for s in examples
        ]
        if got != want:
            raise RuntimeError(f"ONNX greedy output differs from PyTorch's: {got[:2]} vs {want[:2]}")
        if version.exists():
            shutil.rmtree(version)
        version.mkdir(parents=True)
        for f in files:
            shutil.copy(f, version / f.name)
    tokenizer = (
        {"type": "byte", "vocab_size": cfg.vocab_size, "eos_token_id": cfg.eos_id}
        if tok.bpe is None
        else {"type": "tokenizer.json", "vocab_size": cfg.vocab_size, "eos_token_id": cfg.eos_id}
    )
    manifest = {
        "format": "tserve.manifest/v1",
        "kind": "seq2seq",
        "tokenizer": tokenizer,
        "generation": {"eos_token_id": cfg.eos_id, "decoder_start_token_id": cfg.bos_id, "max_target": cfg.max_target},
        "model": cfg.to_dict(),
        "metrics": {k: v for k, v in ckpt["metrics"].items() if k != "samples"},
        "parity": {"greedy_equal": True, "examples": len(examples)},
        # the server re-runs these at load: greedy tokens, without end-of-sequence
        "golden": [
            {"source_ids": list(s), "max_new_tokens": cfg.max_target - 2, "greedy": g} for s, g in zip(examples, got)
        ],
        "files": {f.name: {"sha256": sha256(f)} for f in sorted(version.iterdir())},
    }
    (version / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return version


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("runs/naming/checkpoint.pt"))
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--name", default="namegen")
    p.add_argument(
        "--checkpoint-copy",
        type=Path,
        default=Path("model/checkpoints/namegen.pt"),
        help="where to keep the weights-only checkpoint the parity tests compare against",
    )
    args = p.parse_args(argv)
    print(f"wrote {export_entry(args.checkpoint, args.repository, args.name)}")
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    slim = {k: ckpt[k] for k in ("config", "tokenizer", "model", "step", "train_config") if k in ckpt}
    slim["metrics"] = {k: v for k, v in ckpt["metrics"].items() if k != "samples"}
    args.checkpoint_copy.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, args.checkpoint_copy)  # no optimizer state
    metrics = ckpt["metrics"]
    print(
        f"held-out ({metrics['held_out_examples']} functions): exact match {metrics['held_out']['exact_match']:.1%}, "
        f"sub-token F1 {metrics['held_out']['subtoken_f1']:.3f}"
    )
    for name, b in metrics["baselines"].items():
        print(f"  baseline {name}: exact match {b['exact_match']:.1%}, sub-token F1 {b['subtoken_f1']:.3f}")


if __name__ == "__main__":
    main()
