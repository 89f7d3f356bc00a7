"""Generation: greedy parity with transformers, cache == no cache, sampling distributions, buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jaxlm
from jaxlm.generate import Sampling, compiled_programs, init_cache
from jaxlm.transformer import positions_from_mask


@pytest.fixture(scope="module")
def lm(hf_dir):
    return jaxlm.load(hf_dir("GPT2LMHeadModel"))


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir("GPT2LMHeadModel")).eval()


PROMPTS = ["The meaning of life is", "Hello", "In 1905, Albert Einstein published four papers that"]


def test_greedy_matches_transformers_batch_1(lm, hf_model):
    ids = lm.tokenizer.encode(PROMPTS[0])
    ours = lm.generate([ids], max_new_tokens=64)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_greedy_matches_transformers_left_padded_batch(lm, hf_model):
    rows = [lm.tokenizer.encode(p) for p in PROMPTS]
    width = max(map(len, rows))
    ids = np.full((3, width), 50256)
    mask = np.zeros((3, width), int)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=64)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=64,
                                do_sample=False, pad_token_id=50256).numpy()
    assert ours.shape == (3, width + 64)
    np.testing.assert_array_equal(ours[:, width:], ref[:, width:])
    # Ragged lists give the same continuations as the padded array.
    np.testing.assert_array_equal(lm.generate(rows, max_new_tokens=64)[:, width:], ours[:, width:])


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                  "GemmaForCausalLM", "Gemma2ForCausalLM"])
def test_greedy_matches_transformers_for_decoder_families(hf_dir, arch):
    """3 ragged prompts (left padded), 48 new tokens: Mistral's and Gemma 2's 16-token windows are
    crossed while generating; kv heads are fewer than query heads."""
    path = hf_dir(arch)
    lm = jaxlm.load(path)
    lm = jaxlm.LM(lm.config.replace(eos_token_id=None), lm.params)  # no early stop on either side
    rng = np.random.RandomState(4)
    rows = [list(rng.randint(3, lm.config.vocab_size, n)) for n in (12, 5, 9)]
    ids, mask = np.zeros((3, 12), np.int64), np.zeros((3, 12), np.int64)
    for i, r in enumerate(rows):
        ids[i, 12 - len(r):], mask[i, 12 - len(r):] = r, 1
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=48)
    hf = getattr(transformers, arch).from_pretrained(path, attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=48,
                          do_sample=False, pad_token_id=0).numpy()
    assert lm.config.kv_heads < lm.config.n_heads
    np.testing.assert_array_equal(ours[:, 12:], ref[:, 12:])


def test_cached_decode_equals_full_forward(lm):
    """Prefill then one token at a time over the cache == the full forward, at every position."""
    model = lm.model()
    rows = [lm.tokenizer.encode(p) for p in PROMPTS]
    new = 64  # the generation program of test_greedy_matches_transformers_left_padded_batch
    out = lm.generate(rows, max_new_tokens=new)  # left padded to the longest prompt
    mask = np.ones(out.shape, bool)
    for i, r in enumerate(rows):
        mask[i, :out.shape[1] - new - len(r)] = False
    ids, mask = jnp.asarray(out), jnp.asarray(mask)

    # Compiled (not every operation dispatched on its own): the prefill and the one-token step once
    # each, the cache index a traced scalar as in lm.generate.
    @nnx.jit
    def step(model, ids, positions, cache, index):
        h, cache = model.decode(ids, positions, cache, index, mask)
        return model.head(h), cache

    full = np.asarray(nnx.jit(lambda model: model(ids, mask))(model))
    b, t = ids.shape
    p = t - new
    cache = init_cache(lm.config, b, t)
    positions = positions_from_mask(mask)
    logits, cache = step(model, ids[:, :p], positions[:, :p], cache, 0)
    cached = [np.asarray(logits)]
    for i in range(p, t):
        logits, cache = step(model, ids[:, i:i + 1], positions[:, i:i + 1], cache, i)
        cached.append(np.asarray(logits))
    cached = np.concatenate(cached, axis=1)
    real = np.asarray(mask)
    np.testing.assert_allclose(cached[real], full[real], atol=1e-4)


def reference_distribution(logits, temperature, top_k=0, top_p=1.0):
    """softmax(logits / T) renormalised over the top-k then top-p set, computed directly in numpy."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    allowed = np.ones_like(z, bool)
    if top_k:
        allowed[order[top_k:]] = False
    p = np.exp(z - z.max()) * allowed
    p /= p.sum()
    if top_p < 1:
        ranked = p[order]
        before = np.cumsum(ranked) - ranked
        keep = order[before < top_p]
        allowed = np.zeros_like(allowed)
        allowed[keep] = True
        p = p * allowed
        p /= p.sum()
    return p, allowed


def strict_filter_reference(logits, temperature, top_k, top_p):
    """The kept set of filter_logits' rule in float64: top-k keeps every value >= the k-th largest
    (ties kept), top-p then every token whose strictly more likely tokens hold < top_p."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones(z.shape, bool) if not top_k else z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    above = np.array([p[z > v].sum() for v in z])
    return keep & (above < top_p) if top_p < 1 else keep


def test_filter_logits_keeps_the_rules_sets_on_both_paths():
    """Rows of mixed settings, with ties at the top-k threshold and at the top-p cut: each row's kept
    set is the reference's and the kept logits are logits / T, whether the batch is filtered among
    lax.top_k's 256 candidates (every top-k <= 256) or by bisection (a row of top_k 300 or top-p alone)."""
    from jaxlm.sampling import TOP_CANDIDATES, filter_logits

    rng = np.random.default_rng(0)
    v = 1000
    logits = (rng.normal(size=(6, v)) * 2).astype(np.float32)
    logits[1, 100:140] = logits[1].max() + 1  # 40 tied largest: top-k 20 keeps all 40
    # Row 2: 7 tokens tied at its 9th largest value, and a top-p cut in the middle of them (the
    # 8 above hold less than top_p, the 8 above plus 3.5 of the tied ones as much): all 7 stay.
    logits[2, np.argsort(logits[2])[-15:-9]] = np.sort(logits[2])[-9]
    z = np.sort(logits[2].astype(np.float64) / 0.9)[::-1][:50]
    probs = np.exp(z - z[0]) / np.exp(z - z[0]).sum()
    rows = [(1.0, 5, 1.0), (1.0, 20, 1.0), (0.9, 50, probs[:8].sum() + 3.5 * probs[8]), (1.3, 256, 0.5),
            (1.0, 0, 1.0), (0.8, 10, 0.3)]
    for extra in [None, (1.0, TOP_CANDIDATES + 44, 1.0), (1.0, 0, 0.9)]:  # None: the candidates' path
        settings = rows + ([extra] if extra else [])
        x = np.concatenate([logits, logits[:1]]) if extra else logits
        t, k, p = (np.array(c) for c in zip(*settings))
        out = np.asarray(filter_logits(jnp.asarray(x), jnp.asarray(t, jnp.float32), jnp.asarray(k, jnp.int32),
                                       jnp.asarray(p, jnp.float32)))
        for i, (temperature, top_k, top_p) in enumerate(settings):
            want = strict_filter_reference(x[i], temperature, top_k, top_p)
            assert (np.isfinite(out[i]) == want).all(), (extra, i, np.isfinite(out[i]).sum(), want.sum())
            np.testing.assert_allclose(out[i][want], (x[i] / np.float32(temperature))[want], rtol=1e-6)
    assert [int(np.isfinite(r).sum()) for r in out[:6]] == [5, 40, 15, 38, 1000, 2]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 20, 1.0), (1.0, 0, 0.9),
                                                       (0.8, 50, 0.95)])
def test_sampling_distribution(hf_dir, temperature, top_k, top_p):
    # A 4,096-token vocabulary (sampling 4,096 rows over GPT-2's 50,257 took 4-18 s a case) at init
    # 0.55: peaked enough that 4,096 samples estimate the distribution (sampling noise in TV is
    # ~0.01-0.02, as with the full vocabulary at init 0.7), yet the top-k / top-p sets keep 11-20 tokens.
    lm = jaxlm.load(hf_dir("GPT2LMHeadModel", init_range=0.55, n_layer=1, vocab_size=4096))
    ids = [3358, 2402, 257, 640]
    logits = np.asarray(lm.logits(ids))[0, -1]
    want, allowed = reference_distribution(logits, temperature, top_k, top_p)
    n = 4096
    out = lm.generate([ids], max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                      num_return_sequences=n, seed=1)[:, -1]
    counts = np.bincount(out, minlength=logits.size) / n
    tv = 0.5 * np.abs(counts - want).sum()
    print(f"T={temperature} top_k={top_k} top_p={top_p}: support {allowed.sum()}, TV {tv:.4f}")
    assert allowed[out].all(), "sampled a token outside the top-k / top-p set"
    assert tv <= 0.05
    assert allowed.sum() > 5  # the check is not trivially about one token


def test_seeds_and_batch_independence(lm):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=40)
    a = lm.generate(["Once upon a time"], seed=3, **kw)
    assert a == lm.generate(["Once upon a time"], seed=3, **kw)
    assert a != lm.generate(["Once upon a time"], seed=4, **kw)
    batch = lm.generate(["Once upon a time", "A cat", "Why"], seed=3, **kw)
    assert batch[0] == a[0]
    many = lm.generate(["Once upon a time"], seed=3, num_return_sequences=3, **kw)
    assert many[0] == a[0] and len(set(many)) == 3


def test_new_prompt_length_in_bucket_does_not_recompile(lm):
    lm.generate([[1, 2, 3, 4, 5]], max_new_tokens=4)
    before = compiled_programs()
    lm.generate([[7, 8, 9, 10, 11, 12, 13]], max_new_tokens=4)  # 5 and 7 share the bucket of 8
    lm.generate([[7, 8], [9, 10, 11]], max_new_tokens=4)  # batch 2: a new batch bucket
    assert compiled_programs() == before + 1
    # Sampling settings are arguments of one sampled program, not part of it.
    lm.generate([[1, 2, 3]], max_new_tokens=4, temperature=0.7, seed=1)
    before = compiled_programs()
    for t, k, p in ((1.3, 0, 1.0), (0.5, 40, 1.0), (1.0, 0, 0.9), (0.9, 7, 0.5)):
        lm.generate([[1, 2, 3]], max_new_tokens=4, temperature=t, top_k=k, top_p=p, seed=2)
    assert compiled_programs() == before


def test_eos_ends_a_row_and_stop_strings(lm):
    ids = lm.tokenizer.encode(PROMPTS[0])
    greedy = lm.generate([ids], max_new_tokens=10)[0, len(ids):]
    eos = int(greedy[3])
    stopping = jaxlm.LM(lm.config.replace(eos_token_id=eos, pad_token_id=0), lm.params, lm.tokenizer)
    out = stopping.generate([ids], max_new_tokens=10)[0, len(ids):]
    first = list(greedy).index(eos)
    np.testing.assert_array_equal(out[:first + 1], greedy[:first + 1])
    assert (out[first + 1:] == 0).all()
    steps = []
    stopping.generate([ids], max_new_tokens=10, on_token=lambda i, t: steps.append(i))
    assert steps == list(range(first + 1))  # the loop exits once every row has ended
    text = stopping.generate([PROMPTS[0]], max_new_tokens=10)[0]
    assert text == lm.tokenizer.decode(greedy[:first])
    full = lm.generate([PROMPTS[0]], max_new_tokens=10)[0]
    cut = full[3:6]
    assert lm.generate([PROMPTS[0]], max_new_tokens=10, stop=[cut])[0] == full[:full.index(cut)]


def test_streaming_callback_sees_every_token(lm):
    seen = []
    out = lm.generate([[1, 2, 3]], max_new_tokens=6, on_token=lambda i, t: seen.append((i, int(t[0]))))
    assert [i for i, _ in seen] == list(range(6))
    assert [t for _, t in seen] == list(out[0, 3:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[" x" * 10], max_new_tokens=125), r"prompt of 10 tokens \+ max_new_tokens=125 exceeds the model's context of 128"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(temperature=-0.1), "temperature=-0.1 must be >= 0"),
    (dict(top_k=50258), r"top_k=50258 must be in \[0, 50257\]"),
    (dict(num_return_sequences=0), "num_return_sequences=0 must be >= 1"),
    (dict(prompts=[""]), "prompt 0 is empty"),
])
def test_bad_input(lm, kwargs, message):
    kwargs = {"prompts": ["hi"], **kwargs}
    with pytest.raises(ValueError, match=message):
        lm.generate(**kwargs)


def test_sampling_check_is_static_and_hashable():
    assert hash(Sampling(0.7, 20, 0.9)) == hash(Sampling(0.7, 20, 0.9))
    assert jax.tree.leaves(Sampling()) == [Sampling()]  # a static argument, not a pytree of arrays


def _padded(rows, p, side):
    ids, mask = np.zeros((len(rows), p), np.int32), np.zeros((len(rows), p), bool)
    for i, r in enumerate(rows):
        at = slice(p - len(r), p) if side == "left" else slice(0, len(r))
        ids[i, at], mask[i, at] = r, True
    return jnp.asarray(ids), jnp.asarray(mask)


def test_prefill_scores_the_prompt_left_or_right_padded(lm):
    """generate.prefill (the one prefill of lm.generate, the engine and speculative decoding):
    on left-padded rows (as lm.generate batches prompts) and right-padded ones (as the engine
    buckets a prompt), the next-token logits and the prompt's log-probabilities equal the full
    forward's (log-softmax in float64), and the slots say where each row's text starts and goes on."""
    from jaxlm.generate import prefill

    rows = [lm.tokenizer.encode(p) for p in PROMPTS]
    run = jax.jit(lambda params, ids, mask: prefill(nnx.merge(lm.graphdef, params), ids, mask, 20,
                                                    prompt_logprobs=True))
    left = _padded(rows, 16, "left")
    raw = np.asarray(lm.logits(*left))  # [3, 16, V]: the full forward of the left-padded rows
    full = raw.astype(np.float64) - raw.max(-1, keepdims=True)
    logp = full - np.log(np.exp(full).sum(-1, keepdims=True))
    for side in ("left", "right"):
        pre = run(lm.params, *_padded(rows, 16, side))
        for i, r in enumerate(rows):
            real = np.arange(16 - len(r), 16)  # row i's positions in the reference batch
            want = logp[i, real[:-1], r[1:]]
            start = 16 - len(r) if side == "left" else 0
            got = np.asarray(pre.prompt_logprobs[i])
            np.testing.assert_allclose(got[start + 1:start + len(r)], want, atol=2e-5, err_msg=side)
            assert (got[:start + 1] == 0).all() and (got[start + len(r):] == 0).all()
            np.testing.assert_allclose(np.asarray(pre.logits[i]), raw[i, -1], atol=1e-4)
            assert (int(pre.first[i]), int(pre.slot[i])) == (start, start + len(r))


def test_decode_step_draws_only_the_tokens_a_rows_bitmask_allows(lm):
    """The per-row token mask of the decode step (what constrained decoding fills): a constrained
    greedy row takes the argmax over its allowed tokens (checked against the full forward), a
    constrained sampled row draws only allowed tokens, and unconstrained rows beside them draw
    exactly what they draw with no mask at all."""
    from jaxlm.generate import Rows, decode_step, prefill
    from jaxlm.sampling import allow_all

    v = lm.config.vocab_size
    rng = np.random.default_rng(0)
    allowed = np.sort(rng.choice(v, 7, replace=False))
    bitmask = np.asarray(allow_all(4, v)).copy()
    for r in (0, 2):  # rows 0 (greedy) and 2 (sampled) constrained; 1 (greedy) and 3 (sampled) free
        bitmask[r] = 0
        for t in allowed:
            bitmask[r, t // 32] |= np.uint32(1 << (t % 32))
    prompts = [lm.tokenizer.encode(PROMPTS[i % 3]) for i in range(4)]
    ids, mask = _padded(prompts, 16, "left")
    temperature = jnp.asarray([0.0, 0.0, 1.0, 1.0])

    @jax.jit
    def run(params, bitmask):
        model = nnx.merge(lm.graphdef, params)
        pre = prefill(model, ids, mask, 16 + 8)
        state = Rows(cache=pre.cache, slot=pre.slot, first=pre.first, token=jnp.argmax(pre.logits, -1).astype(jnp.int32),
                     step=jnp.ones(4, jnp.int32), key=jax.random.split(jax.random.key(3), 4), temperature=temperature,
                     top_k=jnp.zeros(4, jnp.int32), top_p=jnp.ones(4), want=jnp.zeros(4, bool), bitmask=bitmask)

        def step(state, _):
            state, (tok, *_) = decode_step(model, state, jnp.ones(4, bool), greedy=False)
            return state, tok

        return jax.lax.scan(step, state, None, length=5)[1].T, pre.logits

    masked, first_logits = run(lm.params, jnp.asarray(bitmask))
    free, _ = run(lm.params, None)
    masked, free = np.asarray(masked), np.asarray(free)
    np.testing.assert_array_equal(masked[[1, 3]], free[[1, 3]])
    assert np.isin(masked[[0, 2]], allowed).all() and not np.isin(free[[0, 2]], allowed).all()
    # Row 0 against the full forward over its whole sequence (causal: position t scores token t + 1).
    seq = prompts[0] + [int(np.argmax(first_logits[0]))] + masked[0].tolist()
    logits = np.asarray(lm.logits([seq]))[0, len(prompts[0]):len(seq) - 1]
    np.testing.assert_array_equal(masked[0], allowed[np.argmax(logits[:, allowed], axis=-1)])
