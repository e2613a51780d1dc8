"""What a training step costs: model FLOPs per step and model FLOPs utilisation (MFU).

FLOPs are counted exactly from the config and the batch shape, as the matmuls the network performs: a
matmul of [m, k] by [k, n] is 2*m*n*k FLOPs (a multiply and an add per term), the convention of XLA's cost
analysis and of the MFU literature (PaLM, appendix B). Elementwise work (norms, softmax, GELU, residual
adds, the loss) and gathers (embedding lookups, relative position biases) count 0: together they are a few
percent of a step at T5 sizes, and hardware peaks are quoted for matmuls.

Training is 3x the forward pass: the backward pass multiplies by each matmul's two operands' transposes,
twice the forward's matmuls (every matmul here has a trainable input on both sides). Recomputation is not
counted (rematerialisation, and the attention backward pass's QK^T, see `layers.dot_product_attention`), so `mfu`
is model FLOPs utilisation, not hardware FLOPs utilisation.
"""
from __future__ import annotations

from t5x_lite import network


def _attention_flops(batch_size: int, query_length: int, key_length: int, config: network.T5Config) -> dict[str, int]:
    """One multi-head attention block: q/o projections on the queries, k/v projections on the keys, and the
    two batched matmuls QK^T [q, k] and weights x V, each 2*b*heads*q*k*head_dim."""
    joined = config.num_heads * config.head_dim
    projections = 2 * batch_size * config.emb_dim * joined * (2 * query_length + 2 * key_length)
    scores = 2 * (2 * batch_size * config.num_heads * query_length * key_length * config.head_dim)
    return {"attention_projections": projections, "attention_scores": scores}


def _mlp_flops(batch_size: int, length: int, config: network.T5Config) -> int:
    """The MLP: one [embed, mlp] kernel per activation (T5.1.1's gated wi_0 and wi_1, T5 1.0's wi), then wo
    [mlp, embed]."""
    kernels = len(config.mlp_activations) + 1
    return kernels * (2 * batch_size * length * config.emb_dim * config.mlp_dim)


def forward_flops(
    config: network.T5Config, batch_size: int, inputs_length: int, targets_length: int
) -> dict[str, int]:
    """Matmul FLOPs of one teacher-forced forward pass over an unpacked batch [batch, length].

    Returns a dict of Python ints with two breakdowns of the same `total`:
      by stack: `encoder` + `decoder` + `logits` == `total`;
      by kind:  `attention_projections` (q, k, v, o) + `attention_scores` (QK^T and weights x V) + `mlp`
                + `logits` == `total`.
    Packing does not change the count: the network attends over the whole packed row (masking, not skipping).
    """
    for name, value in (("batch_size", batch_size), ("inputs_length", inputs_length), ("targets_length", targets_length)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}={value!r}; valid: a positive integer")
    b, inputs, targets = int(batch_size), int(inputs_length), int(targets_length)

    encoder_attention = _attention_flops(b, inputs, inputs, config)
    decoder_self = _attention_flops(b, targets, targets, config)
    # Cross-attention: queries (and the output projection) on the targets, keys and values on the encoder's
    # outputs, scores [targets, inputs].
    decoder_cross = _attention_flops(b, targets, inputs, config)
    kinds_per_encoder_layer = {**encoder_attention, "mlp": _mlp_flops(b, inputs, config)}
    kinds_per_decoder_layer = {
        key: decoder_self[key] + decoder_cross[key] for key in ("attention_projections", "attention_scores")
    }
    kinds_per_decoder_layer["mlp"] = _mlp_flops(b, targets, config)

    kinds = {
        key: config.num_encoder_layers * kinds_per_encoder_layer[key]
        + config.num_decoder_layers * kinds_per_decoder_layer[key]
        for key in ("attention_projections", "attention_scores", "mlp")
    }
    # The output layer (a dense kernel, or the tied embedding via `attend`): [targets, embed] x [embed, vocab].
    logits = 2 * b * targets * config.emb_dim * config.vocab_size
    encoder = config.num_encoder_layers * sum(kinds_per_encoder_layer.values())
    decoder = config.num_decoder_layers * sum(kinds_per_decoder_layer.values())
    total = encoder + decoder + logits
    assert total == sum(kinds.values()) + logits
    return {"encoder": encoder, "decoder": decoder, "logits": logits, **kinds, "total": total}


def train_flops_per_step(
    config: network.T5Config, batch_size: int, inputs_length: int, targets_length: int
) -> int:
    """Model FLOPs of one training step on a batch [batch_size, length]: forward + backward = 3 x forward.

    Gradient accumulation does not change it (the microbatches add up to the batch); optimizer updates are
    elementwise and not counted.
    """
    return 3 * forward_flops(config, batch_size, inputs_length, targets_length)["total"]


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s of the devices that ran the step (the
    sum over all of them when the step is spread over several)."""
    if step_seconds <= 0:
        raise ValueError(f"step_seconds={step_seconds!r}; valid: > 0")
    if peak_flops_per_second <= 0:
        raise ValueError(f"peak_flops_per_second={peak_flops_per_second!r}; valid: > 0")
    return flops_per_step / step_seconds / peak_flops_per_second
