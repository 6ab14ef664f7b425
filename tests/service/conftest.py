"""Repositories for the service tests: the shipped models plus models the tests make."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.transformer import GPTConfig, MultiHeadAttention
from tests.conftest import DEFAULT_REPOSITORY, ROOT
from service.launcher import ServerProcess

ENCODER_VOCAB = 100
ENCODER_HIDDEN = 32


class TinyEncoder(nn.Module):
    """A bidirectional encoder with another signature: input_ids, attention_mask,
    token_type_ids -> last_hidden_state."""

    def __init__(self) -> None:
        super().__init__()
        cfg = GPTConfig(vocab_size=ENCODER_VOCAB, n_head=4, d_model=ENCODER_HIDDEN, d_ff=64)
        self.tok = nn.Embedding(ENCODER_VOCAB, ENCODER_HIDDEN)
        self.typ = nn.Embedding(2, ENCODER_HIDDEN)
        self.attn = MultiHeadAttention(cfg)
        self.norm = nn.LayerNorm(ENCODER_HIDDEN)

    def forward(self, input_ids, attention_mask, token_type_ids):
        x = self.tok(input_ids) + self.typ(token_type_ids)
        mask = attention_mask.bool()[:, None, None, :]  # keys only: no causal mask
        a, _ = self.attn(x, mask)
        return self.norm(x + a)


ENCODER_CONFIG = """name: "encoder"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [
  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] }
]
output [ { name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 32 ] } ]
dynamic_batching { max_queue_delay_microseconds: 5000 }
parameters { key: "tserve.pad_values" value: { string_value: "input_ids=0,attention_mask=0,token_type_ids=0" } }
parameters { key: "tserve.unpad_outputs" value: { string_value: "last_hidden_state" } }
parameters { key: "tserve.vocab_size" value: { string_value: "100" } }
parameters { key: "tserve.max_sequence_length" value: { string_value: "128" } }
"""


def export_encoder(path: Path) -> Path:
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    B, T = 2, 5
    example = (
        torch.randint(0, ENCODER_VOCAB, (B, T)),
        torch.ones(B, T, dtype=torch.int64),
        torch.zeros(B, T, dtype=torch.int64),
    )
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    shapes = {n: {0: batch, 1: seq} for n in ("input_ids", "attention_mask", "token_type_ids")}
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(
        model,
        example,
        dynamo=True,
        dynamic_shapes=shapes,
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state"],
        opset_version=18,
    )
    proto = program.model_proto
    proto.ir_version = 10
    import onnx

    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="session")
def encoder_onnx(tmp_path_factory) -> Path:
    return export_encoder(tmp_path_factory.mktemp("encoder") / "model.onnx")


@pytest.fixture(scope="session")
def repository(tmp_path_factory, encoder_onnx) -> Path:
    """The shipped models, the test encoder, and the encoder again without a config.pbtxt."""
    repo = tmp_path_factory.mktemp("service_repo")
    for name in ("bytegpt", "bytegpt_int8"):
        shutil.copytree(DEFAULT_REPOSITORY / name, repo / name)
    (repo / "encoder" / "1").mkdir(parents=True)
    shutil.copy(encoder_onnx, repo / "encoder" / "1" / "model.onnx")
    (repo / "encoder" / "config.pbtxt").write_text(ENCODER_CONFIG)
    (repo / "encoder_auto" / "1").mkdir(parents=True)
    shutil.copy(encoder_onnx, repo / "encoder_auto" / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def server(repository):
    with ServerProcess(
        repository, "--max-message-bytes", str(1 << 20), "--log-format", "json", "--log-level", "debug"
    ) as s:
        yield s


def random_ids(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, (batch, length), dtype=np.int64)


# -- third-party decoders, built from a config after a fixed seed and exported by Optimum -----

POSITIONS, VOCAB = 128, 300
LLAMA_POSITIONS = 512  # room for a chat with tools
# tools-aware, Hermes-style: the tools in a system block, calls as <tool_call>{...}</tool_call>
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>tools:{% for t in tools %} {{ t.function.name }}"
    "({{ t.function.parameters.properties | list | join(',') }}){% endfor %}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|tool|>{{ m['content'] }}\n"
    "{% elif m.tool_calls is defined and m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}"
    '<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>'
    "{% endfor %}\n"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def export(tmp_path_factory) -> tuple[Path, Path]:
    """(the saved transformers model and tokenizer, the Optimum export folder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("gpt2")
    source, exported = root / "source", root / "onnx"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train(
        [str(p) for p in sorted((ROOT / "model").glob("*.py"))],
        trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(source)
    fast.save_pretrained(source)
    return source, optimum_export(source, "text-generation-with-past", exported)


def optimum_export(source: Path, task: str, out: Path) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "optimum.commands.optimum_cli",
            "export",
            "onnx",
            "--model",
            str(source),
            "--task",
            task,
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def post(server, path: str, body: dict) -> tuple[int, object]:
    """(status, parsed JSON) of a POST to the server's HTTP port, errors included."""
    req = urllib.request.Request(
        server.http_url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wordpiece():
    """A BERT WordPiece tokenizer trained on the model sources: (tokenizers', transformers')."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train(
        [str(p) for p in sorted((ROOT / "model").glob("*.py"))],
        trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials, show_progress=False),
    )
    sep, cls = tok.token_to_id("[SEP]"), tok.token_to_id("[CLS]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    return tok, fast


@pytest.fixture(scope="session")
def llama(export, tmp_path_factory) -> tuple[Path, Path]:
    """A Llama-style decoder (rotary positions, grouped-query attention) with the same tokenizer and a
    chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    tokenizer = AutoTokenizer.from_pretrained(export[0])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LLAMA_POSITIONS,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).eval().save_pretrained(root / "source")
    tokenizer.chat_template = CHAT_TEMPLATE  # Optimum copies it into the export's tokenizer_config.json
    tokenizer.save_pretrained(root / "source")
    return root / "source", optimum_export(root / "source", "text-generation-with-past", root / "onnx")


@pytest.fixture(scope="session")
def references(export, llama) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {
        name: (AutoModelForCausalLM.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source))
        for name, source in (("gpt2", export[0]), ("llama", llama[0]))
    }
