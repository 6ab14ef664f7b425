"""onnxruntime-genai's side of bench/genai_bench.py, run in .venv-genai (its own onnxruntime).

    .venv-genai/bin/python bench/genai_peer.py MODEL_DIR PROMPTS_JSON NEW_TOKENS THREADS

Reads token-id prompts (all the same length), generates greedily with `min_length` so every
stream makes exactly NEW_TOKENS tokens, and prints one JSON line: tokens/s and time to first
token for one stream at a time over the prompts, and for the prompts as one static batch, plus
the generated tokens of each. It imports nothing from tserve.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime_genai as og


def generate(model: og.Model, prompts: np.ndarray, new_tokens: int) -> tuple[list[list[int]], float, float]:
    """(new tokens per row, seconds to the first new token, seconds in all) for one batch."""
    B, T = prompts.shape
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, batch_size=B, max_length=T + new_tokens, min_length=T + new_tokens)
    t0 = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(prompts)  # the prompt's run; its last logits give the first token
    first = time.perf_counter() - t0
    while not generator.is_done():
        generator.generate_next_token()
    wall = time.perf_counter() - t0
    return [list(map(int, generator.get_sequence(i)[T:])) for i in range(B)], first, wall


def main() -> None:
    model_dir, prompts_file, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    config = og.Config(model_dir)
    config.clear_providers()  # CPU
    config.overlay(
        json.dumps(
            {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}
        )
    )
    model = og.Model(config)
    prompts = np.array(json.loads(open(prompts_file).read()), np.int32)
    generate(model, prompts[:1], 8)  # warm-up
    singles, ttft, wall1 = [], [], 0.0
    for row in prompts:
        tokens, first, wall = generate(model, row[None], new_tokens)
        singles += tokens
        ttft.append(first)
        wall1 += wall
    batch, first16, wall16 = generate(model, prompts, new_tokens)
    n = len(prompts) * new_tokens
    print(
        json.dumps(
            {
                "onnxruntime_genai": og.__version__,
                "threads": threads,
                "one_stream_tokens_per_s": n / wall1,
                "one_stream_ttft_ms": float(np.median(ttft)) * 1e3,
                "batch_tokens_per_s": n / wall16,
                "batch_ttft_ms": first16 * 1e3,
                "tokens_one_stream": singles,
                "tokens_batch": batch,
            }
        )
    )


if __name__ == "__main__":
    main()
