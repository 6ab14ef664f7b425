import torch

from model.train import parse_args, train
from model.transformer import load_checkpoint

TINY = ["--block-size", "32", "--d-model", "32", "--d-ff", "64", "--n-layer", "2", "--n-head", "2",
        "--batch-size", "8", "--warmup-steps", "2", "--lr", "3e-3", "--eval-interval", "10",
        "--eval-tokens", "2048", "--final-eval-tokens", "4096", "--max-corpus-bytes", "400000", "--ngram-order", "3"]


def test_train_checkpoint_and_resume(tmp_path):
    tc, mc, _ = parse_args(["--out", str(tmp_path), "--max-steps", "40", *TINY])
    tc.max_steps = 20
    first = train(tc, mc)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert {"config", "model", "optimizer", "step", "metrics", "train_config"} <= ckpt.keys()
    assert ckpt["step"] == 20 and ckpt["config"]["d_model"] == 32
    assert first["val_history"][-1]["val_bpb"] < first["val_history"][0]["val_bpb"] + 1e-9

    tc.max_steps = 40
    resumed = train(tc, mc, resume=True)
    assert resumed["steps"] == 40 and resumed["tokens_seen"] == 40 * 8 * 32
    model, _ = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert resumed["val_bpb"] < 8.0  # far below a uniform guess over 257 ids (8.01 bits)
    assert resumed["ngram_val_bpb"] > 0
    assert model.cfg.n_layer == 2
