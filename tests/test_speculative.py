"""Speculative decoding: greedy output identical to plain greedy, the target's sampling distribution
kept exactly (checked against the distribution computed from its logits), prompt lookup against a
direct reference, and one-line errors."""

import jax
import numpy as np
import pytest
from test_generate import reference_distribution

import jaxlm
from jaxlm.speculative import prompt_lookup


@pytest.fixture(scope="module")
def lm(hf_dir):
    return jaxlm.load(hf_dir("GPT2LMHeadModel"))


@pytest.fixture(scope="module")
def drafts(lm, hf_dir):
    """name -> draft: the target itself (accepts everything), the target with noise on every
    weight (accepts some), a random 1-layer model (accepts ~nothing), prompt lookup."""
    leaves, tree = jax.tree.flatten(lm.params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    noisy = jax.tree.unflatten(tree, [x + 0.03 * x.std() * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return {"self": lm, "noisy": jaxlm.LM(lm.config, noisy, lm.tokenizer),
            "random": hf_dir("GPT2LMHeadModel", n_layer=1), "prompt_lookup": "prompt_lookup"}


# Ragged rows; the last repeats itself, so prompt lookup has something to find.
ROWS = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42, 40, 41, 42, 40, 41]]


@pytest.mark.parametrize("proposer", ["self", "noisy", "random", "prompt_lookup"])
def test_greedy_is_token_for_token_plain_greedy(lm, drafts, proposer):
    """A ragged batch of 4 (K=5): rows accept different counts per round; and batch 1 (K=3) for
    the two proposers that accept some and reject some."""
    cases = [(ROWS, 5)] + ([([ROWS[0]], 3)] if proposer in ("noisy", "prompt_lookup") else [])
    for rows, k in cases:
        plain = lm.generate(rows, max_new_tokens=40)
        spec = lm.generate(rows, max_new_tokens=40, draft=drafts[proposer], speculate_k=k)
        np.testing.assert_array_equal(spec, plain)
        s = lm.last_speculation
        print(proposer, len(rows), k, s)
        assert s.new_tokens == 39 * len(rows)  # the first new token comes from the prompt pass
        if proposer == "self":  # every proposal passes but the last round's, cut at max_new_tokens
            assert s.accepted >= s.proposed - k * len(rows) and s.tokens_per_pass > k
        elif proposer == "noisy":
            assert 0.2 < s.acceptance < 0.95
        elif proposer == "random":
            assert s.acceptance < 0.1


def test_eos_ends_rows_and_streaming_sees_the_same_tokens(lm, drafts):
    plain = lm.generate(ROWS, max_new_tokens=24)
    width = max(map(len, ROWS))
    eos = int(plain[1, width + 6])  # a token row 1 makes mid-way: it becomes the end of sequence
    with_eos = jaxlm.LM(lm.config.replace(eos_token_id=eos, pad_token_id=0), lm.params, lm.tokenizer)
    want = with_eos.generate(ROWS, max_new_tokens=24)
    assert (want[:, width:] == eos).any() and (want[1, width + 7:] == 0).all()
    steps = []
    got = with_eos.generate(ROWS, max_new_tokens=24, draft=drafts["noisy"], speculate_k=4,
                            on_token=lambda i, toks: steps.append((i, toks.copy())))
    np.testing.assert_array_equal(got, want)
    assert [i for i, _ in steps] == list(range(len(steps)))
    streamed = np.stack([t for _, t in steps], axis=1)
    np.testing.assert_array_equal(streamed, got[:, width:width + streamed.shape[1]])


def test_prompt_lookup_matches_a_direct_search():
    """The latest earlier match of the last 3 tokens (else 2, else 1), continued periodically."""
    rng = np.random.default_rng(0)

    def reference(seq, k):
        for g in (3, 2, 1):
            if len(seq) < g:
                continue
            pattern = seq[-g:]
            for j in range(len(seq) - g - 1, -1, -1):
                if seq[j:j + g] == pattern:
                    tail = seq[j + g:]
                    return [tail[i % len(tail)] for i in range(k)]
        return [seq[-1]] * k

    lookup = jax.jit(prompt_lookup, static_argnums=3)
    for _ in range(200):
        length, pad = int(rng.integers(1, 14)), int(rng.integers(0, 4))
        seq = [int(t) for t in rng.integers(0, 4, length)]
        hist = np.array([[99] * pad + seq + [77] * (20 - pad - length)])  # pads before, stale slots after
        got = lookup(jax.numpy.asarray(hist), jax.numpy.array([pad]), jax.numpy.array([pad + length]), 4)
        assert list(np.asarray(got)[0]) == reference(seq, 4), seq


def _exact_marginals(lm, ids, depth, temperature, top_k, top_p):
    """The target's own distribution of each of the first `depth` new tokens, summed over every
    prefix of non-zero probability (computed from lm.logits in numpy)."""
    v = lm.config.vocab_size
    prefixes, probs, marginals = [[]], np.ones(1), []
    for _ in range(depth):
        logits = np.asarray(lm.logits(np.array([ids + p for p in prefixes])))[:, -1]
        nxt = np.stack([reference_distribution(x, temperature, top_k, top_p)[0] for x in logits]) * probs[:, None]
        marginals.append(nxt.sum(0))
        rows, toks = np.nonzero(nxt)
        prefixes = [prefixes[r] + [int(t)] for r, t in zip(rows, toks)]
        probs = nxt[rows, toks]
    assert all(m.size == v for m in marginals)
    return marginals


@pytest.mark.parametrize("proposer, k, ids, accepts", [
    ("self", 1, [358, 402, 257, 40], (0.99, 1.0)),
    ("random", 2, [358, 402, 257, 40], (0.2, 0.8)),  # random weights: rejects about half
    # A repeating prompt (found by a seeded search), so that lookup proposals are sometimes accepted.
    ("prompt_lookup", 2, [491, 319, 491, 319, 491, 362], (0.1, 0.9))])
def test_sampling_keeps_the_target_distribution(hf_dir, proposer, k, ids, accepts):
    """T=0.8, top_k=50, top_p=0.95, 4,096 samples of the first 3 new tokens: each position's
    distribution within TV 0.05 of the exact one (sampling noise alone, from the exact
    distributions' spread: 0.01-0.03). The first token comes
    from the prompt pass, the 2nd and 3rd from the first speculative round: accepted proposals,
    residual draws after a rejection, and (K=1, accepting) the bonus token. A 512-token
    vocabulary keeps the 3rd position's support small enough for 4,096 samples to measure."""
    lm = jaxlm.load(hf_dir("GPT2LMHeadModel", init_range=0.55, n_layer=1, vocab_size=512))
    draft = {"self": lm, "random": hf_dir("GPT2LMHeadModel", init_range=0.3, n_layer=1, vocab_size=512),
             "prompt_lookup": "prompt_lookup"}[proposer]
    settings = dict(temperature=0.8, top_k=50, top_p=0.95)
    want = _exact_marginals(lm, ids, 3, **settings)
    out = np.concatenate([lm.generate([ids], max_new_tokens=3, num_return_sequences=1024, seed=s, draft=draft,
                                      speculate_k=k, **settings)[:, -3:] for s in range(4)])
    tv = [0.5 * np.abs(np.bincount(out[:, i], minlength=want[i].size) / len(out) - want[i]).sum() for i in range(3)]
    print(proposer, k, "TV per position", np.round(tv, 4), lm.last_speculation)
    assert max(tv) <= 0.05
    assert min((w > 0).sum() for w in want[1:]) >= 4  # not about one token
    assert accepts[0] <= lm.last_speculation.acceptance <= accepts[1]  # the paths meant are taken


def test_bad_speculation_settings_are_one_line(lm, hf_dir, cli):
    def error(**kw):
        with pytest.raises(ValueError) as e:
            lm.generate([[1, 2, 3]], max_new_tokens=4, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    other_vocab = hf_dir("GPT2LMHeadModel", init_range=0.55, n_layer=1, vocab_size=4096)
    assert error(draft=other_vocab) == ("the draft's vocabulary has 4096 tokens, the target's 50257: they must "
                                        "share one tokenizer")
    context = lm.config.context
    assert error(draft="prompt_lookup", speculate_k=0) == (
        f"speculate_k=0 must be in [1, {min(32, context - 1)}] (the target's context is {context} tokens)")
    assert error(draft="prompt_lookup", speculate_k=1000).startswith("speculate_k=1000 must be in [1, ")
    assert error(draft="prompt_lookup", speculate_k=2.5) == "speculate_k=2.5 must be an integer"
    assert error(speculate_k=3) == "speculate_k needs a draft: pass draft=LM, a model path or 'prompt_lookup'"
    assert error(draft=hf_dir("BertForMaskedLM")).endswith("is an encoder with a 'mlm' head; it must be a decoder "
                                                         "language model")
    assert error(draft=42) == "draft=42 must be an LM, a model path or 'prompt_lookup'"
    # The command: exit 2, one line, before the model is loaded where it can be.
    model = hf_dir("GPT2LMHeadModel")
    for args, msg in ((["--speculate-k", "2"], "--speculate-k needs --draft (a model path or prompt_lookup)"),
                      (["--draft", "prompt_lookup", "--speculate-k", "0"], "--speculate-k 0 must be in [1, 32]"),
                      (["--draft", other_vocab], "the draft's vocabulary has 4096 tokens")):
        for command in (["generate", model, "--prompt", "Hi"], ["serve", model, "--max-len", "64"]):
            proc = cli(*command, *args)
            assert proc.returncode == 2 and msg in proc.stderr.strip().splitlines()[-1], proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
