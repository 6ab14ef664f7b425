# The README's commands. `make test` and `make serve` install what they need first.
PYTHON  ?= .venv/bin/python
VENV    := .venv
SERVE_STAMP := $(VENV)/.installed-serve
STAMP   := $(VENV)/.installed
SYSTEM  := $(VENV)/.system-tools
REPO    ?= model_repository

.PHONY: install install-serve check-serve-install serve test test-unit lint chaos container-test train parse-rate export protos check-protos bench-serve bench-frontend bench-options bench-http bench-generation bench-structured bench-engine-ab bench-genai bench-smol bench-workers bench-embed bench-tracing bench-seq2seq train-seq2seq export-seq2seq cluster-up cluster-down clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

# Serving only: onnxruntime, grpcio, protobuf, prometheus-client, numpy, pydantic-settings. No torch.
$(SERVE_STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -e .
	touch $(SERVE_STAMP)

# Everything: training, export and the test tools. torch==2.13.0 first, by exact version: it is
# the CPU wheel; a range would pull a CUDA build.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[train,dev]'
	touch $(STAMP) $(SERVE_STAMP)

# Real servers the tests start: Prometheus (and promtool) and nginx, from Debian's packages.
$(SYSTEM): | $(VENV)/bin/python
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v nginx >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus nginx >/dev/null; }
	touch $(SYSTEM)

install: $(STAMP) $(SYSTEM)

install-serve: $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(PYTHON) -m service serve --model-repository $(REPO)

# A fresh venv with the serving install alone: no torch, imports, serves (CI runs it).
check-serve-install:
	.ci/serve-install

test: $(STAMP) $(SYSTEM) lint
	$(PYTHON) -m service.generated.build --check
	$(PYTHON) -m pytest -q

# The in-process tests of the hard parts (engine, caches, sampling, batcher, ...): under a minute
test-unit: $(STAMP)
	$(PYTHON) -m pytest -q -m unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The long reliability suite (the short one runs in make test): about 15 minutes.
chaos: $(STAMP)
	$(PYTHON) -m tests.chaos

# Builds the image with podman on a debootstrapped Debian base and runs it (a few minutes).
container-test: $(STAMP)
	$(PYTHON) -m pytest -q -s -m container tests/deploy/test_container.py

# 40 minutes here, resumable (--resume); the training table is in model/README.md
train: $(STAMP)
	$(PYTHON) -m model.train --out runs/default

# How often greedy completions of held-out def lines parse: the shipped bytegpt against the
# byte 4-gram (add more checkpoints after it to compare them too)
parse-rate: $(STAMP)
	$(PYTHON) -m model.parse_rate model/checkpoints/bytegpt.pt --out model/results/parse_rate.json

# The encoder-decoder (model/seq2seq.py) on the function-naming task: 40 minutes here, resumable
train-seq2seq: $(STAMP)
	$(PYTHON) -m model.train_seq2seq --out runs/naming

export-seq2seq: $(STAMP)
	$(PYTHON) -m export.seq2seq --checkpoint runs/naming/checkpoint.pt --repository $(REPO)

export: $(STAMP)
	$(PYTHON) -m export --checkpoint runs/default/checkpoint.pt --repository $(REPO)

protos: $(STAMP)
	$(PYTHON) -m service.generated.build

check-protos: $(STAMP)
	$(PYTHON) -m service.generated.build --check

bench-serve: $(STAMP)
	$(PYTHON) -m bench.serve_bench

# tserve serving a graph that computes nothing: what the front end costs per request
bench-frontend: $(STAMP)
	$(PYTHON) -m bench.frontend_floor

bench-options: $(STAMP)
	$(PYTHON) -m bench.server_options

bench-http: $(STAMP)
	$(PYTHON) -m bench.http_bench

bench-seq2seq: $(STAMP)
	$(PYTHON) -m bench.seq2seq_bench

bench-generation: $(STAMP)
	$(PYTHON) -m bench.generation_bench

# structured output and log-probabilities on the SmolLM-135M-shaped Llama (built on first run)
bench-structured: $(STAMP)
	$(PYTHON) -m bench.structured_bench

# This checkout's generation against an earlier commit's (BASE=...), both served in one run
BASE ?= HEAD~1
bench-engine-ab: $(STAMP)
	$(PYTHON) -m bench.engine_ab --base $(BASE)

# The peer's own environment: onnxruntime-genai's model builder needs transformers 5.x and
# onnx_ir, and optimum-onnx (in .venv) pins transformers < 4.58. The same onnxruntime as .venv.
GENAI_VENV := .venv-genai
$(GENAI_VENV)/.installed: pyproject.toml $(STAMP)
	python3 -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/pip install -q torch==2.13.0
	$(GENAI_VENV)/bin/pip install -q "transformers==5.17.*" onnxruntime-genai==0.18.0 onnx_ir onnx tokenizers \
		"onnxruntime==$$($(PYTHON) -c 'import onnxruntime; print(onnxruntime.__version__)')"
	touch $@

bench-genai: $(STAMP) $(GENAI_VENV)/.installed
	$(PYTHON) -m bench.genai_bench

# The SmolLM-135M-shaped Llama: tserve (Optimum export, derived graph; genai's folder) against
# onnxruntime-genai, prefix caching on and off, a long prompt joining running streams (~15 min)
bench-smol: $(STAMP) $(GENAI_VENV)/.installed
	$(PYTHON) -m bench.smol_bench

# --workers 2 against 1 on a BERT-style encoder and bytegpt under perf_analyzer (~6 min)
bench-workers: $(STAMP)
	$(PYTHON) -m bench.workers_bench

# The embedding peer's own environment: Infinity on its ONNX Runtime engine (optimum), with the
# CPU torch it needs first by exact version.
INFINITY_VENV := .venv-infinity
$(INFINITY_VENV)/.installed:
	python3 -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/pip install -q torch==2.13.0
	$(INFINITY_VENV)/bin/pip install -q "infinity-emb[server,optimum]==0.0.78"
	touch $@

bench-embed: $(STAMP) $(INFINITY_VENV)/.installed
	$(PYTHON) -m bench.embed_bench

# tracing off and on (100% sampled, to a real collector) against the commit before tracing
bench-tracing: $(STAMP)
	$(PYTHON) -m bench.tracing_bench

cluster-up: $(STAMP) $(SYSTEM)
	$(PYTHON) -m deploy.local.cluster up

cluster-down: $(STAMP)
	$(PYTHON) -m deploy.local.cluster down

clean:
	rm -rf $(VENV) .pytest_cache
