"""Parity between the exported ONNX graph (run in ONNX Runtime) and the PyTorch model.

Logits are compared on random and real inputs across the shapes the server produces
(batch 1 and >1, one token and long prompts, left padding, empty and non-empty past), and
greedy decoding with the KV cache is compared token for token, alone and in a padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from model.transformer import GPT, positions_from_mask


def cpu_session(path: Path | str, optimize: bool = True, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def decoder_feeds(
    n_layer: int, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray]
) -> dict[str, np.ndarray]:
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    for i in range(n_layer):
        feeds[f"past_key_values.{i}.key"] = past[2 * i]
        feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
    return feeds


def empty_past(model: GPT, batch: int) -> list[np.ndarray]:
    c = model.cfg
    return [np.zeros((batch, c.n_head, 0, c.head_dim), np.float32) for _ in range(2 * c.n_layer)]


@dataclass
class Case:
    name: str
    input_ids: np.ndarray
    attention_mask: np.ndarray  # (B, past + T)
    past: list[np.ndarray]

    @property
    def position_ids(self) -> np.ndarray:
        T = self.input_ids.shape[1]
        return positions_from_mask(torch.from_numpy(self.attention_mask)).numpy()[:, -T:]


def parity_cases(model: GPT, real_prompts: list[list[int]], seed: int = 0) -> list[Case]:
    """Random and real inputs across the shapes a server produces."""
    c = model.cfg
    rng = np.random.default_rng(seed)

    def rand_ids(B: int, T: int) -> np.ndarray:
        return rng.integers(0, c.vocab_size, (B, T), dtype=np.int64)

    def rand_past(B: int, P: int) -> list[np.ndarray]:
        return [rng.standard_normal((B, c.n_head, P, c.head_dim)).astype(np.float32) for _ in range(2 * c.n_layer)]

    long_T = c.block_size
    cases = [
        Case("batch1_seq1_empty_past", rand_ids(1, 1), np.ones((1, 1), np.int64), empty_past(model, 1)),
        Case("batch1_long", rand_ids(1, long_T), np.ones((1, long_T), np.int64), empty_past(model, 1)),
        Case("batch4_seq32", rand_ids(4, 32), np.ones((4, 32), np.int64), empty_past(model, 4)),
        Case("batch2_seq1_past17", rand_ids(2, 1), np.ones((2, 18), np.int64), rand_past(2, 17)),
        Case("batch3_seq5_past9", rand_ids(3, 5), np.ones((3, 14), np.int64), rand_past(3, 9)),
    ]
    # left padding: real prompts of different lengths in one batch
    T = max(len(p) for p in real_prompts)
    ids = np.full((len(real_prompts), T), 256, np.int64)
    mask = np.zeros((len(real_prompts), T), np.int64)
    for row, p in enumerate(real_prompts):
        ids[row, T - len(p) :] = p
        mask[row, T - len(p) :] = 1
    cases.append(Case("real_prompts_left_padded", ids, mask, empty_past(model, len(real_prompts))))
    return cases


@torch.no_grad()
def logits_max_abs_diff(model: GPT, session: ort.InferenceSession, case: Case) -> float:
    c = model.cfg
    feeds = decoder_feeds(c.n_layer, case.input_ids, case.attention_mask, case.position_ids, case.past)
    onnx_logits = session.run(["logits"], feeds)[0]
    past = [(torch.from_numpy(case.past[2 * i]), torch.from_numpy(case.past[2 * i + 1])) for i in range(c.n_layer)]
    ref, _ = model(
        torch.from_numpy(case.input_ids),
        torch.from_numpy(case.attention_mask),
        torch.from_numpy(case.position_ids),
        past,
    )
    ref = ref.numpy()
    # rows of left padding are not outputs anyone reads; compare real positions only
    T = case.input_ids.shape[1]
    real = case.attention_mask[:, -T:].astype(bool)
    if not np.isfinite(onnx_logits).all():
        return float("inf")
    return float(np.abs(onnx_logits - ref)[real].max())


def onnx_greedy(
    model: GPT, session: ort.InferenceSession, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch with the KV cache, entirely in ONNX Runtime.
    The caller keeps max(len(prompt)) + max_new_tokens within the model's context."""
    c = model.cfg
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = np.full((B, T), 256, np.int64)
    mask = np.zeros((B, T), np.int64)
    for row, p in enumerate(prompts):
        ids[row, T - len(p) :] = p
        mask[row, T - len(p) :] = 1
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    past = empty_past(model, B)
    out: list[list[int]] = [[] for _ in range(B)]
    n_out = len(session.get_outputs())
    for _ in range(max_new_tokens):
        res = session.run(None, decoder_feeds(c.n_layer, ids, mask, positions, past))
        nxt = res[0][:, -1].argmax(-1)
        for row in range(B):
            out[row].append(int(nxt[row]))
        past = list(res[1:n_out])
        ids = nxt[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
    return out


def verify(model: GPT, onnx_path: Path, real_prompts: list[list[int]], greedy_tokens: int = 64) -> dict:
    """The parity report stored in the manifest; raises if parity fails."""
    session = cpu_session(onnx_path)
    # every prompt gets the same number of tokens, all inside the trained context
    greedy_tokens = min(greedy_tokens, model.cfg.block_size - max(len(p) for p in real_prompts))
    diffs = {case.name: logits_max_abs_diff(model, session, case) for case in parity_cases(model, real_prompts)}
    reference = [model.generate(p, greedy_tokens) for p in real_prompts]
    alone = [onnx_greedy(model, session, [p], greedy_tokens)[0] for p in real_prompts]
    batched = onnx_greedy(model, session, real_prompts, greedy_tokens)
    report = {
        "max_abs_logits_diff": max(diffs.values()),
        "cases": {k: float(f"{v:.3g}") for k, v in diffs.items()},
        "greedy_tokens": greedy_tokens,
        "greedy_equal_alone": alone == reference,
        "greedy_equal_batched": batched == reference,
    }
    if report["max_abs_logits_diff"] > 1e-4 or not (report["greedy_equal_alone"] and report["greedy_equal_batched"]):
        raise AssertionError(f"ONNX parity failed: {report}")
    return report
