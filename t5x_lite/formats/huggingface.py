"""Hugging Face transformers' T5 <-> t5x_lite: the config fields and the parameter names, on numpy arrays.

Nothing here imports torch: a state dict is a mapping from transformers' parameter names to numpy arrays, however
it was read. transformers keeps torch's layout: a linear layer's weight is [out, in] where t5x_lite's (and T5X's)
kernel is [in, out], and the relative position bias table is [buckets, heads] where ours is [heads, buckets]; each
of those is transposed on the way. Parameters are always in the unscanned layout (`layers_<i>`); see
`network.scan_params` for the scanned one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import network

# transformers' `feed_forward_proj` <-> T5X's `mlp_activations`. transformers' "gated-gelu" is GELU's tanh
# approximation (gelu_new), as T5X's and ours.
_FEED_FORWARD_PROJ = {"gated-gelu": ("gelu", "linear"), "relu": ("relu",)}

# State dict entries that are copies of `shared.weight` (transformers ties them to it): not parameters of their own.
_EMBEDDING_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def t5_config_from_hf(hf_config: Mapping[str, Any], **overrides) -> network.T5Config:
    """A T5Config from a transformers T5 `config.json` (as a dict); `overrides` set other fields (scan_layers, ...).

    Whether the logits are tied is read from `tie_word_embeddings` as the file states it (transformers 5 forces the
    attribute to True when it builds its config object, so read the file, not the object).
    """
    proj = hf_config.get("feed_forward_proj", "relu")
    if proj not in _FEED_FORWARD_PROJ:
        raise ValueError(f"feed_forward_proj={proj!r} in the Hugging Face config; supported: {sorted(_FEED_FORWARD_PROJ)}")
    fields = dict(
        vocab_size=hf_config["vocab_size"],
        emb_dim=hf_config["d_model"],
        num_heads=hf_config["num_heads"],
        head_dim=hf_config["d_kv"],
        mlp_dim=hf_config["d_ff"],
        num_encoder_layers=hf_config["num_layers"],
        num_decoder_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        mlp_activations=_FEED_FORWARD_PROJ[proj],
        logits_via_embedding=bool(hf_config.get("tie_word_embeddings", True)),
    )
    return network.T5Config(**{**fields, **overrides})


def hf_config_from_t5(config: network.T5Config) -> dict[str, Any]:
    """The transformers `config.json` fields of a T5Config (pad 0, EOS 1, decoder start 0, as T5's vocabularies)."""
    proj = {v: k for k, v in _FEED_FORWARD_PROJ.items()}[config.mlp_activations]
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "num_heads": config.num_heads,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "feed_forward_proj": proj,
        "tie_word_embeddings": config.logits_via_embedding,
        "scale_decoder_outputs": config.logits_via_embedding,
        "dropout_rate": config.dropout_rate,
        "layer_norm_epsilon": 1e-6,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def parameter_names(config: network.T5Config) -> list[tuple[str, tuple[str, ...], bool]]:
    """(transformers' name, t5x_lite's parameter path, whether the array is transposed between them) for every
    parameter of `config`'s model."""
    names = [("shared.weight", ("token_embedder", "embedding"), False)]
    mlp = ["wi_0", "wi_1"] if config.mlp_activations == ("gelu", "linear") else ["wi"]
    for stack, num_layers in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
        names.append((f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      (stack, "relpos_bias", "rel_embedding"), True))
        names.append((f"{stack}.final_layer_norm.weight", (stack, f"{stack}_norm", "scale"), False))
        attentions = ([("SelfAttention", "attention", "pre_attention_layer_norm")] if stack == "encoder" else
                      [("SelfAttention", "self_attention", "pre_self_attention_layer_norm"),
                       ("EncDecAttention", "encoder_decoder_attention", "pre_cross_attention_layer_norm")])
        for i in range(num_layers):
            hf, ours = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
            for j, (hf_attention, attention, norm) in enumerate(attentions):
                names.append((f"{hf}.{j}.layer_norm.weight", ours + (norm, "scale"), False))
                for hf_projection, projection in zip("qkvo", ("query", "key", "value", "out")):
                    names.append((f"{hf}.{j}.{hf_attention}.{hf_projection}.weight",
                                  ours + (attention, projection, "kernel"), True))
            j = len(attentions)
            names.append((f"{hf}.{j}.layer_norm.weight", ours + ("pre_mlp_layer_norm", "scale"), False))
            for dense in mlp + ["wo"]:
                names.append((f"{hf}.{j}.DenseReluDense.{dense}.weight", ours + ("mlp", dense, "kernel"), True))
    if not config.logits_via_embedding:
        names.append(("lm_head.weight", ("decoder", "logits_dense", "kernel"), True))
    return names


def params_from_hf(state_dict: Mapping[str, np.ndarray], config: network.T5Config) -> dict[str, Any]:
    """t5x_lite's (unscanned) float32 parameters from a transformers T5 state dict of numpy arrays.

    Every parameter of `config`'s model must be there with its shape, and nothing else may be (but the stacks'
    copies of the shared embedding, and a tied model's `lm_head.weight`, which transformers writes as the shared
    embedding); a mismatch raises ValueError naming the parameters.
    """
    names = parameter_names(config)
    expected = {hf for hf, _, _ in names}
    ignored = set(_EMBEDDING_ALIASES) | ({"lm_head.weight"} if config.logits_via_embedding else set())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected - ignored)
    if missing or unexpected:
        raise ValueError(f"the Hugging Face state dict does not fit the model: missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    shapes = _parameter_shapes(config)
    params: dict[str, Any] = {}
    for hf, path, transposed in names:
        array = np.asarray(state_dict[hf], np.float32)
        array = array.T if transposed else array
        if array.shape != shapes[path]:
            raise ValueError(f"Hugging Face parameter {hf} has shape {np.shape(state_dict[hf])}; the model's "
                             f"{'/'.join(path)} needs {shapes[path][::-1] if transposed else shapes[path]}")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return params


def _parameter_shapes(config: network.T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every (unscanned) parameter's path and shape, from an abstract initialisation (nothing allocated)."""
    module = network.Transformer(dataclasses.replace(config, scan_layers=False))
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda e, d: module.init(jax.random.PRNGKey(0), e, d), tokens, tokens)["params"]
    return {tuple(getattr(k, "key", k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract))}


def hf_from_params(params: Mapping[str, Any], config: network.T5Config) -> dict[str, np.ndarray]:
    """A transformers T5 state dict (numpy, float32) from t5x_lite's unscanned parameters."""
    state_dict = {}
    for hf, path, transposed in parameter_names(config):
        array = params
        for key in path:
            array = array[key]
        array = np.asarray(array, np.float32)
        state_dict[hf] = np.ascontiguousarray(array.T if transposed else array)
    return state_dict
