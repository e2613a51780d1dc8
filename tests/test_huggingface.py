"""t5x_lite against Hugging Face transformers' T5, an independent implementation, on the same random weights.

The weights are drawn by transformers (torch) and mapped with `formats.huggingface`; the two models must then give
the same teacher-forced logits and the same cached greedy decodes (tokens and log-likelihoods), for T5.1.1 (gated
GELU, untied logits) and T5 1.0 (ReLU, tied logits scaled by d_model**-0.5), unrolled and scanned. The comparison
needs the `bench` extra (torch, transformers) and is skipped without it; the name mapping is tested either way.
"""
import dataclasses

import numpy as np
import pytest

from t5x_lite import models, network
from t5x_lite.formats import huggingface
from tests.helpers import random_batch

# Encoder and decoder of different depths, heads that are not a power of two wide.
T5_1_1 = network.T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=6, mlp_dim=48, num_encoder_layers=2,
                          num_decoder_layers=3)
T5_1_0 = dataclasses.replace(T5_1_1, mlp_activations=("relu",), logits_via_embedding=True)
CONFIGS = {"t5_1_1": T5_1_1, "t5_1_0": T5_1_0}
# float32 throughout; measured max |difference| of the logits: see the test's assertion message.
TOLERANCE = 1e-4
MISSING_BENCH_EXTRA = "needs the bench extra (torch, transformers): .venv/bin/pip install -c constraints.txt -e '.[bench]'"


@pytest.fixture(scope="module")
def transformers():
    pytest.importorskip("torch", reason=MISSING_BENCH_EXTRA)
    return pytest.importorskip("transformers", reason=MISSING_BENCH_EXTRA)


def hf_model(transformers, config, seed=0):
    """transformers' T5ForConditionalGeneration for `config`, with random weights: its own initialisation, the
    layer norms' scales drawn around 1 (so that a misplaced scale shows), and an untied output layer of its own."""
    import torch

    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**huggingface.hf_config_from_t5(config)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.uniform_(0.5, 1.5)
        if not config.logits_via_embedding:  # transformers 5 ties lm_head to `shared` when it builds a T5
            model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn(config.vocab_size, config.emb_dim))
    return model.eval()


def state_dict_of(model):
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_names_cover_the_model_and_round_trip(name):
    """Every t5x_lite parameter has one transformers name, and state dict -> params -> state dict is exact."""
    config = CONFIGS[name]
    shapes = huggingface._parameter_shapes(config)
    names = huggingface.parameter_names(config)
    assert sorted(path for _, path, _ in names) == sorted(shapes)
    rng = np.random.default_rng(0)
    state_dict = {hf: rng.normal(size=shapes[path][::-1] if transposed else shapes[path]).astype(np.float32)
                  for hf, path, transposed in names}
    back = huggingface.hf_from_params(huggingface.params_from_hf(state_dict, config), config)
    assert sorted(back) == sorted(state_dict)
    for key in state_dict:
        np.testing.assert_array_equal(back[key], state_dict[key], err_msg=key)


def test_a_state_dict_that_does_not_fit_is_refused():
    state_dict = huggingface.hf_from_params(_zero_params(T5_1_1), T5_1_1)
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        huggingface.params_from_hf({k: v for k, v in state_dict.items() if k != "lm_head.weight"}, T5_1_1)
    with pytest.raises(ValueError, match=r"unexpected \['decoder.block.3.layer.0.layer_norm.weight'\]"):
        huggingface.params_from_hf({**state_dict, "decoder.block.3.layer.0.layer_norm.weight": np.ones(32)}, T5_1_1)
    wrong = dict(state_dict, **{"encoder.block.0.layer.1.DenseReluDense.wo.weight": np.zeros((32, 40), np.float32)})
    with pytest.raises(ValueError, match=r"wo.weight has shape \(32, 40\); the model's encoder/layers_0/mlp/wo/kernel "
                                         r"needs \(32, 48\)"):
        huggingface.params_from_hf(wrong, T5_1_1)


def _zero_params(config):
    params = {}
    for path, shape in huggingface._parameter_shapes(config).items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.zeros(shape, np.float32)
    return params


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers(transformers, name, scan):
    import torch

    config = dataclasses.replace(CONFIGS[name], scan_layers=scan)
    model = hf_model(transformers, config)
    params = huggingface.params_from_hf(state_dict_of(model), config)
    params = network.scan_params(params) if scan else params
    batch = random_batch(batch_size=4, inputs_length=12, targets_length=7, vocab_size=128, seed=3)
    ours = network.Transformer(config).apply({"params": params}, batch["encoder_input_tokens"],
                                             batch["decoder_input_tokens"], batch["decoder_target_tokens"])
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(batch["encoder_input_tokens"]).long(),
                       attention_mask=torch.as_tensor(batch["encoder_input_tokens"] > 0).long(),
                       decoder_input_ids=torch.as_tensor(batch["decoder_input_tokens"]).long()).logits.numpy()
    real = batch["decoder_target_tokens"] > 0  # transformers has no mask for the padded target positions
    difference = np.abs(np.asarray(ours)[real] - theirs[real]).max()
    assert difference <= TOLERANCE, f"max |logits difference| {difference:.2e}"
    assert np.abs(theirs[real]).max() > 1.0  # logits of a size where a missing scale would show


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_greedy_decoding_equals_transformers_generate(transformers, name):
    """Our cached greedy decode gives transformers' `generate` tokens (0 after EOS) and the log-likelihood of
    them computed from transformers' step logits."""
    import torch

    # transformers' generate sizes its decoding cache by the encoder's depth (config.num_layers), so the decoder
    # may not be the deeper stack here.
    config = dataclasses.replace(CONFIGS[name], num_encoder_layers=3, num_decoder_layers=2)
    # Seeds whose decodes are not one token repeated (random tied models tend to repeat their input), and in
    # T5.1.1's case reach EOS in one row.
    model = hf_model(transformers, config, seed={"t5_1_1": 1, "t5_1_0": 3}[name])
    params = huggingface.params_from_hf(state_dict_of(model), config)
    batch = random_batch(batch_size=4, inputs_length=12, targets_length=7, vocab_size=128, seed=4)
    length = 10
    tokens, scores = models.EncoderDecoderModel(config).predict_batch(
        params, {"encoder_input_tokens": batch["encoder_input_tokens"]}, max_decode_length=length,
        return_scores=True)
    inputs = torch.as_tensor(batch["encoder_input_tokens"]).long()
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=(inputs > 0).long(), max_new_tokens=length,
                             min_new_tokens=0, do_sample=False, num_beams=1, decoder_start_token_id=0, eos_token_id=1,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    generated = out.sequences[:, 1:].numpy()
    expected = np.zeros((4, length), np.int64)
    expected[:, :generated.shape[1]] = generated
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    log_probs = torch.stack(out.logits, 1).log_softmax(-1).numpy()
    chosen = np.take_along_axis(log_probs, generated[..., None], -1)[..., 0]
    ended_before = np.cumsum(generated == 1, axis=1) - (generated == 1) > 0
    expected_scores = np.where(ended_before, 0.0, chosen).sum(1)
    np.testing.assert_allclose(np.asarray(scores), expected_scores, atol=TOLERANCE, rtol=1e-5)
    assert len(np.unique(expected)) >= 4
