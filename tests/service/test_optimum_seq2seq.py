"""Third-party encoder-decoders exported by Optimum (`text2text-generation-with-past`), dropped
into the repository as Optimum wrote them: served with continuous batching and compared with
transformers' own greedy generate. BART (learned positions, no decoder attention mask in its
decoder_with_past graph) and T5 (relative position buckets), built from configs after a fixed
seed, no Hub. Each is served twice: as Optimum writes the folder (the two plain decoders are
used), and with only decoder_model_merged.onnx beside the encoder (the If graph's branches)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from service.launcher import ServerProcess
from tests.service.test_optimum_export import optimum_export

VOCAB = 300


def _wide(model) -> object:
    """Weights wide enough that a random model's answers depend on its source."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    out = {}
    torch.manual_seed(0)
    bart = _wide(
        BartForConditionalGeneration(
            BartConfig(
                vocab_size=VOCAB,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=64,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
                decoder_start_token_id=2,
                forced_eos_token_id=None,
            )
        )
    )
    torch.manual_seed(0)
    t5 = _wide(
        T5ForConditionalGeneration(
            T5Config(
                vocab_size=VOCAB,
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=2,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    )
    for name, model in (("bart", bart), ("t5", t5)):
        root = tmp_path_factory.mktemp(name)
        model.save_pretrained(root / "source")
        out[name] = (model, optimum_export(root / "source", "text2text-generation-with-past", root / "onnx"))
    return out


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    repo = tmp_path_factory.mktemp("optimum_seq2seq_repo")
    for name, (_, folder) in models.items():
        shutil.copytree(folder, repo / name / "1")  # nothing added: no config.pbtxt, no manifest
        merged = repo / f"{name}_merged" / "1"
        shutil.copytree(folder, merged)
        (merged / "decoder_model.onnx").unlink()
        (merged / "decoder_with_past_model.onnx").unlink()
        assert (merged / "decoder_model_merged.onnx").is_file()
    with ServerProcess(repo, "--generation-max-sequences", "4") as s:
        yield s


def transformers_greedy(model, source: list[int], n: int) -> list[int]:
    ids = torch.tensor([source])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, num_beams=1, min_length=0
        )
    return out[0, 1:].tolist()  # without the decoder start token


@pytest.mark.parametrize("name", ["bart", "t5", "bart_merged", "t5_merged"])
def test_greedy_generation_equals_transformers_alone_and_batched(models, server, name):
    model = models[name.removesuffix("_merged")][0]
    rng = np.random.default_rng(1)
    sources = [rng.integers(3, VOCAB, int(n)).tolist() for n in (3, 9, 17, 30, 5, 12)]
    jobs = [(i, int(n)) for i, n in zip(rng.integers(0, len(sources), 24), rng.integers(2, 16, 24))]
    want = {(i, n): transformers_greedy(model, sources[i], n) for i, n in set(jobs)}
    assert len({tuple(v) for v in want.values()}) > 3  # answers differ by source
    with grpc.insecure_channel(server.address) as ch:
        stub = gen_grpc.TextGenerationStub(ch)

        def run(job):
            i, n = job
            return list(
                stub.Generate(
                    gen.GenerateRequest(model=name, token_ids=gen.TokenIds(ids=sources[i]), max_new_tokens=n),
                    timeout=60,
                ).token_ids
            )

        alone = run(jobs[0])
        with ThreadPoolExecutor(6) as ex:
            batched = list(ex.map(run, jobs))
    assert alone == want[jobs[0]]
    for job, tokens in zip(jobs, batched):
        assert tokens == want[job], job
