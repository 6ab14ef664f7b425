"""The Transformer in PyTorch, its byte tokenizer, corpus and training loop (training extra)."""
