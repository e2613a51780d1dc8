"""Shared test fixtures: a tiny model config and synthetic batches (no seqio, no files)."""
import numpy as np

from t5x_lite import network

# Every sharded dimension divides 8 devices.
TINY = network.T5Config(
    vocab_size=128, emb_dim=32, num_heads=8, head_dim=4, mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2
)


def random_batch(batch_size=8, inputs_length=16, targets_length=8, vocab_size=128, seed=0, padding=True):
    """An unpacked EncDecFeatureConverter-style batch of numpy arrays, with some trailing padding."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab_size, (batch_size, inputs_length)).astype(np.int32)
    targets = rng.integers(2, vocab_size, (batch_size, targets_length)).astype(np.int32)
    if padding:
        for i in range(batch_size):
            inputs[i, rng.integers(inputs_length // 2, inputs_length + 1):] = 0
            targets[i, rng.integers(targets_length // 2, targets_length + 1):] = 0
    decoder_inputs = np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets > 0).astype(np.float32),
    }
