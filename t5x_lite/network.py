"""The T5 encoder-decoder (T5.1.1, T5 1.0): one frozen config dataclass and the Flax modules it drives.

Read top to bottom: `T5Config`, the two layer types, the stacks (optionally scanned over layers and
rematerialised), and `Transformer` with its `encode` / `decode` methods. `scan_params` and
`unscan_params` convert between the scanned and unscanned parameter layouts.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import layers

Array = jax.Array

REMAT_POLICIES = {
    "none": None,
    # Keep the matmul outputs, recompute the cheap elementwise work (norms, GELU, softmax) backwards.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep only each layer's input; recompute the whole layer backwards.
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shapes and switches of a T5 model; the gin files in gin/models/ bind these fields."""

    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 6
    head_dim: int = 64
    mlp_dim: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    dropout_rate: float = 0.0
    # Activation dtype ("float32" or "bfloat16"); parameters are always float32.
    dtype: str = "float32"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # T5X's names: ('gelu', 'linear') is T5.1.1's gated-GELU MLP (wi_0, wi_1), ('relu',) T5 1.0's (one wi).
    mlp_activations: tuple[str, ...] = ("gelu", "linear")
    # T5 1.0 ties the output layer to the input embedding; T5.1.1 does not.
    logits_via_embedding: bool = False
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; valid: {sorted(REMAT_POLICIES)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}; valid: 'float32', 'bfloat16'")
        # gin gives a list where Python code gives a tuple; the frozen config keeps a (hashable) tuple.
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        if self.mlp_activations not in layers.MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activations={self.mlp_activations!r}; valid: {', '.join(map(repr, layers.MLP_ACTIVATIONS))}")

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def _dropout(config: T5Config) -> nn.Dropout:
    # T5 drops whole feature vectors per position pattern shared along the length axis.
    return nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))


class EncoderLayer(nn.Module):
    config: T5Config
    deterministic: bool

    @nn.compact
    def __call__(self, x: Array, bias: Array | None, mask: Array | None):
        """x: [batch, length, embed]; bias: the position bias [batch|1, heads, length, length]; mask:
        bool[batch, 1, length, length]."""
        cfg, dtype = self.config, self.config.activation_dtype
        h = layers.RMSNorm(dtype=dtype, name="pre_attention_layer_norm")(x)
        h = layers.MultiHeadAttention(
            cfg.num_heads, cfg.head_dim, cfg.dropout_rate, dtype, name="attention"
        )(h, h, bias, mask, deterministic=self.deterministic)
        x = x + _dropout(cfg)(h, deterministic=self.deterministic)
        h = layers.RMSNorm(dtype=dtype, name="pre_mlp_layer_norm")(x)
        h = layers.Mlp(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, dtype, name="mlp")(
            h, deterministic=self.deterministic)
        x = x + _dropout(cfg)(h, deterministic=self.deterministic)
        x = layers.constrain(x, ("batch", "length", "embed"))
        return (x, None) if cfg.scan_layers else x


class DecoderLayer(nn.Module):
    config: T5Config
    deterministic: bool
    decode: bool

    @nn.compact
    def __call__(
        self, y: Array, encoded: Array | None, self_bias: Array, self_mask: Array | None, cross_mask: Array
    ):
        """y: [batch, length, embed]; encoded: [batch, enc_length, embed] (None in decode steps); self_bias: the
        position bias [batch|1, heads, length, length]; self_mask: bool[batch|1, 1, length, length] (None in decode
        steps); cross_mask: bool[batch, 1, length, enc_length]."""
        cfg, dtype = self.config, self.config.activation_dtype
        attention = lambda name: layers.MultiHeadAttention(
            cfg.num_heads, cfg.head_dim, cfg.dropout_rate, dtype, name=name
        )
        h = layers.RMSNorm(dtype=dtype, name="pre_self_attention_layer_norm")(y)
        h = attention("self_attention")(h, h, self_bias, self_mask, deterministic=self.deterministic, decode=self.decode)
        y = y + _dropout(cfg)(h, deterministic=self.deterministic)
        h = layers.RMSNorm(dtype=dtype, name="pre_cross_attention_layer_norm")(y)
        h = attention("encoder_decoder_attention")(
            h, encoded, None, cross_mask, deterministic=self.deterministic, decode=self.decode, cross_attention=True
        )
        y = y + _dropout(cfg)(h, deterministic=self.deterministic)
        h = layers.RMSNorm(dtype=dtype, name="pre_mlp_layer_norm")(y)
        h = layers.Mlp(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, dtype, name="mlp")(
            h, deterministic=self.deterministic)
        y = y + _dropout(cfg)(h, deterministic=self.deterministic)
        y = layers.constrain(y, ("batch", "length", "embed"))
        return (y, None) if cfg.scan_layers else y


def _run_stack(module: nn.Module, layer_cls, num_layers: int, x: Array, *args, **layer_kwargs) -> Array:
    """Applies `num_layers` layers to x, scanned (params [layers, ...]) or unrolled (layers_0, layers_1, ...)."""
    cfg: T5Config = module.config
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
        layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(cfg, name="layers", **layer_kwargs)(x, *args)
        return x
    for i in range(num_layers):
        x = layer_cls(cfg, name=f"layers_{i}", **layer_kwargs)(x, *args)
    return x


def _relative_position_bias(cfg: T5Config, *, bidirectional: bool) -> layers.RelativePositionBias:
    """The stack's one bias table, shared by its layers (bidirectional in the encoder, causal in the decoder)."""
    return layers.RelativePositionBias(
        cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance,
        cfg.num_heads,
        bidirectional=bidirectional,
        dtype=cfg.activation_dtype,
        name="relpos_bias",
    )


def _positions(tokens: Array, positions: Array | None) -> Array:
    if positions is not None:
        return positions
    return jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]


class Encoder(nn.Module):
    config: T5Config
    embedder: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array | None, positions: Array | None, deterministic: bool):
        """tokens: int32[batch, length] -> [batch, length, embed]."""
        cfg, dtype = self.config, self.config.activation_dtype
        x = self.embedder(tokens)
        x = layers.constrain(_dropout(cfg)(x, deterministic=deterministic), ("batch", "length", "embed"))
        valid = tokens > 0
        mask = layers.combine_masks(
            layers.attention_mask(valid, valid),
            None if segment_ids is None else layers.segment_mask(segment_ids, segment_ids),
        )
        pos = _positions(tokens, positions)
        position_bias = _relative_position_bias(cfg, bidirectional=True)(pos, pos)
        x = _run_stack(self, EncoderLayer, cfg.num_encoder_layers, x, position_bias, mask, deterministic=deterministic)
        x = layers.RMSNorm(dtype=dtype, name="encoder_norm")(x)
        return _dropout(cfg)(x, deterministic=deterministic)


class Decoder(nn.Module):
    config: T5Config
    embedder: nn.Module

    @nn.compact
    def __call__(
        self,
        encoded: Array | None,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None,
        encoder_segment_ids: Array | None,
        decoder_segment_ids: Array | None,
        decoder_positions: Array | None,
        deterministic: bool,
        decode: bool,
        max_decode_length: int | None,
    ) -> Array:
        """-> logits float32[batch, length, vocab]; see `Transformer.decode` for the arguments."""
        cfg, dtype = self.config, self.config.activation_dtype
        y = self.embedder(decoder_input_tokens)
        y = layers.constrain(_dropout(cfg)(y, deterministic=deterministic), ("batch", "length", "embed"))
        relpos = _relative_position_bias(cfg, bidirectional=False)
        encoder_valid = encoder_input_tokens > 0
        if decode and decoder_input_tokens.shape[1] == 1 and max_decode_length:
            # One decode step: the self-attention takes the current row of this full-cache bias.
            all_positions = jnp.arange(max_decode_length, dtype=jnp.int32)[None, :]
            self_bias = relpos(all_positions, all_positions)
            self_mask = None
            query_valid = jnp.ones(decoder_input_tokens.shape, dtype=bool)
            cross_mask = layers.attention_mask(query_valid, encoder_valid)
        else:
            length = decoder_input_tokens.shape[1]
            query_valid = (
                decoder_target_tokens > 0
                if decoder_target_tokens is not None
                else jnp.ones(decoder_input_tokens.shape, dtype=bool)
            )
            self_mask = layers.combine_masks(
                layers.causal_mask(length),
                layers.attention_mask(query_valid, query_valid),
                None if decoder_segment_ids is None else layers.segment_mask(decoder_segment_ids, decoder_segment_ids),
            )
            pos = _positions(decoder_input_tokens, decoder_positions)
            self_bias = relpos(pos, pos)
            cross_mask = layers.combine_masks(
                layers.attention_mask(query_valid, encoder_valid),
                None
                if decoder_segment_ids is None
                else layers.segment_mask(decoder_segment_ids, encoder_segment_ids),
            )
        y = _run_stack(
            self, DecoderLayer, cfg.num_decoder_layers, y, encoded, self_bias, self_mask, cross_mask,
            deterministic=deterministic, decode=decode,
        )
        y = layers.RMSNorm(dtype=dtype, name="decoder_norm")(y)
        y = _dropout(cfg)(y, deterministic=deterministic)
        # The logits are float32 whatever the activations' dtype, as in T5X: the loss, the scores and the argmax
        # all read them.
        if cfg.logits_via_embedding:
            # T5 1.0: the tied output layer rescales by 1/sqrt(d) to undo the embedding's unit variance.
            logits = self.embedder.attend(y) / jnp.sqrt(jnp.float32(y.shape[-1]))
        else:
            logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.float32, name="logits_dense")(y)
        return layers.constrain(logits, ("batch", "length", "vocab"))


class Transformer(nn.Module):
    """T5 encoder-decoder. `__call__` returns logits float32[batch, target_length, vocab]."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.activation_dtype)
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(
        self,
        encoder_input_tokens: Array,
        encoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        *,
        enable_dropout: bool = False,
    ) -> Array:
        """encoder_input_tokens: int32[batch, enc_length] -> [batch, enc_length, embed]."""
        return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions, not enable_dropout)

    def decode(
        self,
        encoded: Array | None,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        *,
        enable_dropout: bool = False,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> Array:
        """Teacher-forced logits, or (decode=True) one cached step.

        encoded: [batch, enc_length, embed] (ignored in decode steps once the cross-attention cache holds
        the projected encoder keys/values); decoder_input_tokens: int32[batch, length] (length 1 in decode
        steps; the full max_decode_length at the call that creates the cache).
        -> logits [batch, length, vocab].
        """
        return self.decoder(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            decoder_positions,
            not enable_dropout,
            decode,
            max_decode_length,
        )

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        decoder_positions: Array | None = None,
        *,
        enable_dropout: bool = False,
    ) -> Array:
        encoded = self.encode(
            encoder_input_tokens, encoder_segment_ids, encoder_positions, enable_dropout=enable_dropout
        )
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            decoder_positions,
            enable_dropout=enable_dropout,
        )


_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def scan_params(params: dict[str, Any]) -> dict[str, Any]:
    """Unscanned layout (encoder/layers_0, layers_1, ...) -> scanned (encoder/layers with a leading layer axis)."""

    def convert(tree):
        if not isinstance(tree, dict):
            return tree
        numbered = sorted((int(m.group(1)), k) for k in tree if (m := _LAYER_KEY.match(k)))
        out = {k: convert(v) for k, v in tree.items() if not _LAYER_KEY.match(k)}
        if numbered:
            stacked = [tree[k] for _, k in numbered]
            out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs, axis=0), *stacked)
        return out

    return convert(params)


def unscan_params(params: dict[str, Any]) -> dict[str, Any]:
    """Scanned layout (encoder/layers with a leading layer axis) -> unscanned (layers_0, layers_1, ...)."""

    def convert(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: convert(v) for k, v in tree.items() if k != "layers"}
        if "layers" in tree:
            num_layers = jax.tree.leaves(tree["layers"])[0].shape[0]
            for i in range(num_layers):
                out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], tree["layers"])
        return out

    return convert(params)
