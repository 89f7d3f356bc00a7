"""Model invariants that need no reference implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import ModelConfig, build_model
from jaxlm.transformer import abstract_model, params_for

from conftest import ragged_batch

SMALL = dict(vocab_size=97, max_len=32, d_model=32, n_layers=3, n_heads=4, init_std=0.2)
VARIANTS = {
    "gpt2": ModelConfig.preset("gpt2-tiny", **SMALL),
    "bert": ModelConfig.preset("bert-tiny", **SMALL),
    # A Llama-shaped decoder: RMSNorm, rotary positions, grouped-query heads, SiLU, no biases.
    "rope-gqa": ModelConfig.preset("gpt2-tiny", **SMALL, norm="rmsnorm", positions="rope",
                                   n_kv_heads=2, activation="silu", use_bias=False, tie_embeddings=False),
    # The original Transformer's encoder block: sinusoidal positions, post-LN, ReLU.
    "classic": ModelConfig.preset("bert-tiny", **SMALL, positions="sinusoidal", activation="relu",
                                  type_vocab_size=0),
}


# Compiled forwards (eager calls would compile every operation for every new shape); the scan test
# below keeps an eager reference.
@nnx.jit
def forward(model, ids, mask=None, segments=None, key=None):
    return model(ids, mask, segment_ids=segments, key=key)


@nnx.jit
def hidden(model, ids, mask=None):
    return model.hidden_states(ids, mask)


def run(cfg, ids, mask=None, **kw):
    return np.asarray(forward(build_model(cfg.replace(**kw)), jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


@pytest.mark.parametrize("name", ["gpt2", "rope-gqa"])
def test_causality(name):
    cfg = VARIANTS[name]
    ids, _ = ragged_batch(cfg.vocab_size, [12], seed=0)
    base = run(cfg, ids)
    t = 7
    changed = ids.copy()
    changed[0, t] = (changed[0, t] + 1) % cfg.vocab_size
    out = run(cfg, changed)
    np.testing.assert_array_equal(out[0, :t], base[0, :t])
    assert np.abs(out[0, t:] - base[0, t:]).max(axis=-1).min() > 1e-4  # every later position moves


def test_encoder_is_bidirectional():
    cfg = VARIANTS["bert"]
    ids, _ = ragged_batch(cfg.vocab_size, [12], seed=0)
    changed = ids.copy()
    changed[0, 7] = (changed[0, 7] + 1) % cfg.vocab_size
    assert np.abs(run(cfg, changed)[0, :7] - run(cfg, ids)[0, :7]).max() > 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_scan_unrolled_remat_and_jit_agree(name):
    cfg = VARIANTS[name].replace(n_layers=2)  # 2 layers: scanned vs unrolled all the same, less to compile
    ids, mask = ragged_batch(cfg.vocab_size, [10, 6], seed=1)
    model = build_model(cfg)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))  # eager, scan

    def forward(p, scan, remat):
        c = cfg.replace(scan_layers=scan, remat=remat)
        m = nnx.merge(nnx.graphdef(abstract_model(c)), params_for(c, p))
        return m(jnp.asarray(ids), jnp.asarray(mask))

    # Gradients too: remat and scan change how the backward pass is computed, not its result.
    def loss(p, scan, remat):
        return jnp.mean(jax.nn.log_softmax(forward(p, scan, remat))[..., 0] * mask)

    combos = [(scan, remat) for scan in (True, False) for remat in (False, True)]

    @jax.jit  # one compiled program: every forward and both gradients
    def everything(p):
        return ([forward(p, scan, remat) for scan, remat in combos],
                [jax.grad(loss)(p, s, r) for s, r in ((True, False), (False, True))])

    outputs, grads = everything(params)
    for got in outputs:
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
    for g in grads[1:]:
        for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "rope-gqa"])
def test_left_padding_keeps_real_token_logits(name):
    cfg = VARIANTS[name]
    ids, _ = ragged_batch(cfg.vocab_size, [9], seed=2)
    alone = run(cfg, ids)
    pad = 4
    padded = np.concatenate([np.full((1, pad), 5), ids], axis=1)
    mask = np.concatenate([np.zeros((1, pad), int), np.ones_like(ids)], axis=1)
    out = run(cfg, padded, mask)
    np.testing.assert_allclose(out[:, pad:], alone, atol=2e-5)


def test_right_padding_keeps_real_token_hidden_states_in_encoder():
    cfg = VARIANTS["bert"]
    ids, _ = ragged_batch(cfg.vocab_size, [9], seed=3)
    model = build_model(cfg)
    alone = np.asarray(hidden(model, jnp.asarray(ids)))
    padded = np.concatenate([ids, np.full((1, 3), 0)], axis=1)
    mask = np.concatenate([np.ones_like(ids), np.zeros((1, 3), int)], axis=1)
    out = np.asarray(hidden(model, jnp.asarray(padded), jnp.asarray(mask)))
    np.testing.assert_allclose(out[:, :9], alone, atol=2e-5)


def test_dropout_only_with_key_and_reproducible():
    cfg = VARIANTS["gpt2"]
    model = build_model(cfg)
    ids = jnp.asarray(ragged_batch(cfg.vocab_size, [8], seed=4)[0])
    eval_a, eval_b = forward(model, ids), forward(model, ids)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    k = jax.random.key(0)
    np.testing.assert_array_equal(np.asarray(forward(model, ids, key=k)), np.asarray(forward(model, ids, key=k)))
    assert not np.allclose(np.asarray(forward(model, ids, key=k)), np.asarray(eval_a))


def test_param_layout_is_stacked_with_logical_axes():
    cfg = VARIANTS["rope-gqa"]
    state = nnx.state(build_model(cfg), nnx.Param)
    q = state["layers"]["blocks"]["attn"]["q"]["kernel"]
    k = state["layers"]["blocks"]["attn"]["k"]["kernel"]
    assert q.shape == (3, 32, 4, 8) and k.shape == (3, 32, 2, 8)
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    assert "lm_head" in state and "positions" not in state["embed"]


def test_bfloat16_compute_close_to_float32():
    cfg = VARIANTS["gpt2"].replace(init_std=0.02)
    ids = ragged_batch(cfg.vocab_size, [10], seed=5)[0]
    full, half = run(cfg, ids), run(cfg, ids, dtype="bfloat16")
    assert half.dtype == np.float32  # logits always float32
    assert np.abs(full - half).max() < 0.05 * np.abs(full).max() + 1e-2


@pytest.mark.parametrize("name", ["gpt2", "rope-gqa", "bert"])
def test_packed_segments_equal_each_example_alone(name):
    """Examples packed into one row with segment ids: each gets exactly its logits when run alone
    (positions restart, no attention across examples), and example 2 does not see example 1."""
    cfg = VARIANTS[name]
    model = build_model(cfg)
    lengths = [7, 11, 5]
    ids, _ = ragged_batch(cfg.vocab_size, [sum(lengths) + 3], seed=4)  # 3 padding slots at the end
    segments = np.zeros_like(ids)
    at = 0
    for s, n in enumerate(lengths, 1):
        segments[0, at:at + n] = s
        at += n
    packed = np.asarray(forward(model, jnp.asarray(ids), segments=jnp.asarray(segments)))
    at = 0
    for n in lengths:
        alone = np.asarray(forward(model, jnp.asarray(ids[:, at:at + n])))
        np.testing.assert_allclose(packed[:, at:at + n], alone, atol=1e-5)
        at += n
    other = ids.copy()
    other[0, :lengths[0]] = (other[0, :lengths[0]] + 3) % cfg.vocab_size  # a different example 1
    changed = np.asarray(forward(model, jnp.asarray(other), segments=jnp.asarray(segments)))
    assert np.abs(changed[0, :lengths[0]] - packed[0, :lengths[0]]).max() > 1e-3
    np.testing.assert_array_equal(changed[0, lengths[0]:sum(lengths)], packed[0, lengths[0]:sum(lengths)])
