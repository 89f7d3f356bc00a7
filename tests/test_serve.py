"""Serving: the continuous-batching engine against lm.generate (alone, one prompt at a time), and a
live `jaxlm serve` driven by the official openai client."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import jax
import numpy as np
import pytest

import jaxlm
from jaxlm.serve import Engine, QueueFull

from conftest import TEST_XLA_FLAGS

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPTS = ["def f(x):", "import os\nimport sys\n", "The quick brown fox jumps over the lazy dog. " * 3, "a",
           "class A:\n    pass", "for i in range(10):", "#", "x = [1, 2, 3]\nprint(x)\n" * 2]


@pytest.fixture(scope="module")
def model_dir(hf_dir, tmp_path_factory):
    """A random GPT-2 with its real tokenizer and a chat template."""
    dst = tmp_path_factory.mktemp("serve") / "gpt2-chat"
    shutil.copytree(hf_dir("GPT2LMHeadModel"), dst)
    (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE,
                                                           "eos_token": "<|endoftext|>"}))
    return dst


@pytest.fixture(scope="module")
def lm(model_dir):
    return jaxlm.load(model_dir)


def ids(lm, text):
    return lm.tokenizer.encode(text, add_special_tokens=False)


def settings(i):
    """Request i's settings: greedy, top-k + top-p or top-k sampling by turns, each with its own
    seed and length (three kinds: lm.generate compiles a program per length, greedy or sampled).

    Sampled comparisons with lm.generate keep a top-k: this random model's next-token distribution
    is nearly flat over 50k tokens (each ~2e-5), so float32 sums that differ in the last bits (a
    batch of 4 rows vs 1, a cache of 128 slots vs 43) move a pure top-p cut by a token and the
    sample with it. Over the top 40 tokens the same noise changes nothing."""
    return dict(max_tokens=[5, 11, 17][i % 3], seed=100 + i, temperature=[0.0, 0.8, 1.3][i % 3],
                top_k=[0, 40, 5][i % 3], top_p=[1.0, 0.9, 1.0][i % 3])


def alone(lm, prompt, s, n=1, stop=None, **kw):
    return lm.generate([prompt], max_new_tokens=s["max_tokens"], temperature=s["temperature"], top_k=s["top_k"],
                       top_p=s["top_p"], seed=s["seed"], num_return_sequences=n, stop=stop, **kw)


def test_batching_changes_nothing(lm):
    """8 concurrent requests of different lengths and settings in 4 slots: each equals its prompt
    generated alone by lm.generate, greedy and sampled, and the same request sent alone to the engine."""
    engine = Engine(lm, max_batch=4, max_len=128).start()
    try:
        # Prompts of 1-5 tokens in one prompt bucket: lm.generate compiles one program per settings kind.
        short = [p[:8] for p in PROMPTS]
        requests = [(p, settings(i), engine.submit(ids(lm, p), **settings(i))) for i, p in enumerate(short)]
        for p, s, r in requests:
            (choice,) = r.result(timeout=120)
            assert choice.text == alone(lm, p, s)[0], (p, s)
            assert choice.finish_reason == "length" and len(choice.token_ids) == s["max_tokens"]
        # Pure top-p sampling, 8 requests at once: each equals the same request sent alone (rows of
        # one batch do not see each other; the batch shape is the same, so the numbers are too).
        pure = dict(max_tokens=9, temperature=0.9, top_p=0.9)
        together = [engine.submit(ids(lm, p), seed=i, **pure) for i, p in enumerate(short)]
        for i, (p, r) in enumerate(zip(short, together)):
            assert r.result()[0].token_ids == engine.submit(ids(lm, p), seed=i, **pure).result()[0].token_ids
        two = engine.submit(ids(lm, PROMPTS[0]), n=2, **settings(1)).result()
        assert [c.text for c in two] == alone(lm, PROMPTS[0], settings(1), n=2) and two[0].text != two[1].text
    finally:
        engine.stop()
    assert engine.slots_in_use == 0 and engine.error is None


def test_speculative_serving_gives_lm_generates_tokens(lm, model_dir):
    """A draft proposing 3 tokens per step (the model in bfloat16: close to it, so proposals are
    both accepted and rejected), 6 greedy and top-k + top-p requests in 4 slots: each equals lm.generate
    with the same draft and seed (one key schedule), greedy ones plain greedy decoding; the
    log-probabilities are the model's own; the Prometheus counters count the proposals."""
    from jaxlm.serve.metrics import Metrics

    draft = jaxlm.load(model_dir, dtype="bfloat16")
    engine = Engine(lm, max_batch=4, max_len=128, draft=draft, speculate_k=3)
    metrics = engine.metrics = Metrics(engine)
    engine.start()
    try:
        # Two settings kinds (each compiles a speculative lm.generate program).
        short = [(i, p[:8]) for i, p in enumerate(PROMPTS) if i % 3 < 2]
        requests = [(p, settings(i), engine.submit(ids(lm, p), logprobs=2, **settings(i))) for i, p in short]
        seqs = []
        for p, s, r in requests:
            (choice,) = r.result(timeout=120)
            assert choice.text == alone(lm, p, s, draft=draft, speculate_k=3)[0], (p, s)
            assert len(choice.token_ids) == s["max_tokens"] and choice.finish_reason == "length"
            if s["temperature"] == 0:
                assert choice.text == alone(lm, p, s)[0]
            seqs.append((ids(lm, p), choice))
        # A stop string inside a round's block, and a request of two choices (two slots).
        p, s = short[0][1], settings(0)
        text = seqs[0][1].text
        stop = text[len(text) // 2:len(text) // 2 + 2]
        (cut,) = engine.submit(ids(lm, p), stop=[stop], **s).result()
        assert cut.text == alone(lm, p, s, stop=[stop], draft=draft, speculate_k=3)[0] == text[:text.index(stop)]
        assert cut.finish_reason == "stop"
        two = engine.submit(ids(lm, p), n=2, **settings(1)).result()
        assert [c.text for c in two] == alone(lm, p, settings(1), n=2, draft=draft, speculate_k=3)
    finally:
        engine.stop()
    # Each token's log-probability under the model (one right-padded lm.logits call for all).
    width = max(len(a) + len(c.token_ids) for a, c in seqs)
    batch, mask = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), np.int32)
    for i, (a, c) in enumerate(seqs):
        batch[i, :len(a) + len(c.token_ids)], mask[i, :len(a) + len(c.token_ids)] = a + c.token_ids, 1
    lp = np.asarray(jax.nn.log_softmax(lm.logits(batch, mask), axis=-1))
    for i, (a, c) in enumerate(seqs):
        at = len(a) - 1 + np.arange(len(c.token_ids))
        np.testing.assert_allclose(c.logprobs, lp[i, at, c.token_ids], atol=1e-4)
    assert 0.5 < engine.acceptance < 1, engine.acceptance  # accepted and rejected proposals both
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.render().decode().splitlines()
              if line.startswith("jaxlm_draft") and "_total" in line}
    assert values == {"jaxlm_draft_tokens_total": engine.proposed, "jaxlm_draft_accepted_tokens_total": engine.accepted}


def test_a_draft_must_hold_the_servers_rows(lm, hf_dir):
    short = hf_dir("GPT2LMHeadModel", n_positions=64)
    with pytest.raises(ValueError) as e:
        Engine(lm, max_batch=2, max_len=128, draft=short)
    assert str(e.value) == "max_len=128 exceeds the draft's context of 64 tokens: use max_len <= 64"


def test_sliding_window_and_grouped_kv_heads(hf_dir):
    """Mistral (kv heads < heads, a 16-token window): prompts + new tokens cross the window."""
    lm = jaxlm.load(hf_dir("MistralForCausalLM", sliding_window=16))
    engine = Engine(lm, max_batch=3, max_len=64).start()
    try:
        rows = [list(range(5 + 7 * i, 5 + 7 * i + n)) for i, n in enumerate((3, 12, 20))]
        reqs = [engine.submit(r, max_tokens=30, temperature=0.0) for r in rows]
        # lm.generate on the three rows at once (left padded; one compiled program, not one per
        # prompt bucket): test_generate checks Mistral's batched greedy tokens against transformers.
        batch = lm.generate(rows, max_new_tokens=30)[:, max(map(len, rows)):]
        for want, req in zip(batch, reqs):
            got = req.result(timeout=120)[0].token_ids
            assert got == [int(t) for t in want[:len(got)]] and len(got) == 30
    finally:
        engine.stop()


def test_mixed_sampling_compiles_nothing_after_warmup(lm):
    engine = Engine(lm, max_batch=4, max_len=128)
    engine.warmup()
    compiled = engine.compiled_programs()
    engine.start()
    try:
        rng = np.random.default_rng(0)
        reqs = [engine.submit(ids(lm, PROMPTS[i % 8]) * (1 + i % 3), max_tokens=int(rng.integers(1, 12)),
                              temperature=float(rng.choice([0, 0.5, 1.0, 2.0])), top_k=int(rng.choice([0, 1, 7, 100])),
                              top_p=float(rng.choice([1.0, 0.95, 0.3])), seed=i, n=int(rng.integers(1, 3)),
                              logprobs=int(rng.choice([0, 3])) if i % 2 else None, stop=["\n"] if i % 5 == 0 else [])
                for i in range(24)]
        for r in reqs:
            r.result(timeout=120)
    finally:
        engine.stop()
    assert engine.compiled_programs() == compiled


def test_logprobs_stop_and_cancel(lm):
    import jax

    engine = Engine(lm, max_batch=2, max_len=128).start()
    try:
        prompt = ids(lm, PROMPTS[1])
        (c,) = engine.submit(prompt, max_tokens=6, temperature=0.0, logprobs=3).result()
        # The reported log-probabilities are log_softmax of the model's logits (a direct formula).
        full = np.asarray(jax.nn.log_softmax(lm.logits([prompt + c.token_ids])[0], axis=-1))
        for t, (tok, lp, top) in enumerate(zip(c.token_ids, c.logprobs, c.top_logprobs)):
            row = full[len(prompt) - 1 + t]
            np.testing.assert_allclose(lp, row[tok], atol=1e-4)
            assert [i for i, _ in top] == list(np.argsort(-row)[:3]) and tok == top[0][0]  # greedy: the top one
        # A stop string ends the choice early and frees the slot; the text stops before it.
        full_text = alone(lm, PROMPTS[1], dict(settings(0), max_tokens=20))[0]
        stop = full_text[5:8]
        (c,) = engine.submit(prompt, max_tokens=20, temperature=0.0, stop=[stop]).result()
        assert c.text == alone(lm, PROMPTS[1], dict(settings(0), max_tokens=20), stop=[stop])[0] == full_text[:5]
        assert c.finish_reason == "stop" and len(c.token_ids) < 20
        events = []
        r = engine.submit(prompt, max_tokens=100, temperature=0.0, stop=[stop], on_event=events.append)
        r.result(timeout=60)
        assert "".join(e.text for e in events) == full_text[:5]  # streamed text never shows the stop string
        # Cancelling frees the slot before the next step.
        r = engine.submit(prompt, max_tokens=100, temperature=0.0)
        next(r.events())
        r.cancel()
        assert r.result(timeout=60)[0].finish_reason == "cancelled" and len(r.choices[0].token_ids) < 100
        deadline = time.time() + 10
        while engine.slots_in_use and time.time() < deadline:
            time.sleep(0.01)
        assert engine.slots_in_use == 0
    finally:
        engine.stop()


def test_bad_requests_and_a_full_queue(lm):
    engine = Engine(lm, max_batch=2, max_len=64, max_queue=2)  # not started: requests stay queued
    for kw, message in [(dict(max_tokens=0), "max_tokens=0 must be >= 1"),
                        (dict(max_tokens=60), "max_tokens=60 does not fit: the prompt's 5 tokens leave room for 59"),
                        (dict(temperature=-1), "temperature=-1.0 must be >= 0"),
                        (dict(top_p=0), r"top_p=0.0 must be in \(0, 1\]"), (dict(n=3), r"n=3 must be in \[1, 2\]"),
                        (dict(logprobs=21), r"logprobs=21 must be in \[0, 20\]")]:
        with pytest.raises(ValueError, match=message):
            engine.submit([1, 2, 3, 4, 5], **kw)
    with pytest.raises(ValueError, match="the prompt has 64 tokens; this server takes at most 63"):
        engine.submit([1] * 64)
    engine.submit([1]), engine.submit([2])
    with pytest.raises(QueueFull, match=r"2 requests are already waiting \(--max-queue 2\)"):
        engine.submit([3])
    with pytest.raises(ValueError, match="serving needs a decoder"):
        Engine(jaxlm.load(pytest.importorskip("jaxlm.testing").minilm_dir()))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop re-raises
def test_a_failed_prefill_ends_its_request_instead_of_leaving_it_waiting(lm, monkeypatch):
    """A request the loop has taken from the queue but not yet placed in its slots still hears of
    the engine's failure (before: it waited forever)."""
    engine = Engine(lm, max_batch=2, max_len=64)

    def broken(*args, **kwargs):
        raise RuntimeError("prefill failed")

    monkeypatch.setattr(engine, "_start_rows", broken)
    engine.start()
    events = []
    request = engine.submit([1, 2, 3], max_tokens=4, on_event=events.append)
    (choice,) = request.result(timeout=60)
    assert choice.finish_reason == "error" and [e.finish_reason for e in events] == ["error"]
    assert isinstance(engine.error, RuntimeError) and not engine.alive


# -- a live server ---------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model_dir, *args, env=None):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "serve", str(model_dir), "--port", str(port),
                             "--max-len", "128", *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(model_dir):
    with serve(model_dir, "--max-batch", "4") as (proc, url):
        yield url


def client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_openai_client_completions(server, lm):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["gpt2-chat"]
    s = settings(4)
    kw = dict(model="gpt2-chat", max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"],
              seed=s["seed"], extra_body={"top_k": s["top_k"]})
    r = c.completions.create(prompt=PROMPTS[0], n=2, **kw)
    assert [ch.text for ch in r.choices] == alone(lm, PROMPTS[0], s, n=2)
    assert r.usage.prompt_tokens == len(ids(lm, PROMPTS[0])) and r.usage.completion_tokens == 2 * s["max_tokens"]
    r = c.completions.create(prompt=PROMPTS[:3], **kw)  # a list of prompts: one choice each, in order
    assert [ch.text for ch in r.choices] == [alone(lm, p, s)[0] for p in PROMPTS[:3]]
    chunks = list(c.completions.create(prompt=PROMPTS[0], stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == alone(lm, PROMPTS[0], s)[0]
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == s["max_tokens"]
    greedy = alone(lm, PROMPTS[1], dict(settings(0), max_tokens=20))[0]  # compiled by test_logprobs_stop_and_cancel
    r = c.completions.create(prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=[greedy[6:9]], logprobs=2,
                             model="gpt2-chat")
    assert r.choices[0].text == greedy[:6] and r.choices[0].finish_reason == "stop"
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(t <= 0 for t in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)


def test_openai_client_chat(server, lm):
    c = client(server)
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    prompt = "<|system|>You write Python.\n<|user|>A loop, please.\n<|assistant|>"
    s = settings(2)
    kw = dict(model="gpt2-chat", messages=messages, max_tokens=s["max_tokens"], temperature=s["temperature"],
              top_p=s["top_p"], seed=s["seed"], extra_body={"top_k": s["top_k"]})
    r = c.chat.completions.create(**kw)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == alone(lm, prompt, s)[0]
    assert r.usage.prompt_tokens == len(ids(lm, prompt))
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, n=2, logprobs=True,
                                            top_logprobs=1, **kw))
    texts = ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
             for i in range(2)]
    assert texts == alone(lm, prompt, s, n=2)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2 * s["max_tokens"]
    assert sum(len(ch.choices[0].logprobs.content) for ch in chunks if ch.choices and ch.choices[0].logprobs) == \
        2 * s["max_tokens"]


def test_bad_input_is_answered_and_the_server_keeps_serving(server):
    import openai

    c = client(server)
    stream = c.completions.create(model="gpt2-chat", prompt=PROMPTS[2], max_tokens=60, temperature=0, stream=True)
    first = next(iter(stream))  # another client is being served meanwhile
    post = lambda path, body, **kw: httpx.post(f"{server}{path}", content=body if isinstance(body, bytes)  # noqa: E731
                                               else json.dumps(body), timeout=30, **kw)
    base = {"model": "gpt2-chat", "prompt": "hi"}
    for body, status, message in [
        (b'{"model": "gpt2-chat", "prompt": ', 400, "not valid JSON"),
        ({**base, "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist; this server has 'gpt2-chat'"),
        ({**base, "prompt": "x " * 200}, 400, "this server takes at most 127"),
        ({**base, "max_tokens": 128}, 400, "max_tokens=128 does not fit: the prompt.s 1 tokens leave room for 127"),
        ({**base, "temperature": -0.5}, 400, "temperature=-0.5 must be >= 0"),
        ({**base, "top_p": 1.5}, 400, r"top_p=1.5 must be in \(0, 1\]"),
        ({**base, "n": 0}, 400, r"n=0 must be in \[1, 4\]"),
        ({**base, "presence_penalty": 0.5}, 400, "'presence_penalty' is not supported by jaxlm"),
        ({**base, "frobnicate": 1}, 400, "'frobnicate' is not a field of this endpoint"),
        (b"x" * (9 << 20), 413, "the limit is 8388608"),
    ]:
        r = post("/v1/completions", body)
        assert r.status_code == status, (body, r.text)
        import re
        assert re.search(message, r.json()["error"]["message"]), r.json()
        assert r.json()["error"]["type"]
    assert post("/v1/completions", {**base, "presence_penalty": 0}).status_code == 200  # its no-op value
    with pytest.raises(openai.BadRequestError, match="must be >= 0"):
        c.completions.create(model="gpt2-chat", prompt="hi", temperature=-1)
    rest = "".join(ch.choices[0].text for ch in stream if ch.choices)
    assert first.choices[0].text is not None and len(rest) > 0  # the other client finished


def test_disconnect_frees_the_slot_and_metrics(server):
    with httpx.stream("POST", f"{server}/v1/completions", json={"model": "gpt2-chat", "prompt": "hello",
                      "max_tokens": 120, "temperature": 0, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert httpx.get(f"{server}/health").json()["slots_in_use"] == 1
    deadline = time.time() + 20
    while httpx.get(f"{server}/health").json()["slots_in_use"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server}/health").json()["slots_in_use"] == 0
    text = httpx.get(f"{server}/metrics").text
    for name in ("jaxlm_requests_total", "jaxlm_prompt_tokens_total", "jaxlm_generated_tokens_total",
                 "jaxlm_queue_depth", "jaxlm_slots_in_use", "jaxlm_time_to_first_token_seconds_bucket",
                 "jaxlm_inter_token_latency_seconds_bucket"):
        assert name in text, name
    assert 'jaxlm_requests_total{endpoint="/v1/completions",status="200"}' in text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("jaxlm_")}
    assert values["jaxlm_generated_tokens_total"] > 0 and values["jaxlm_time_to_first_token_seconds_count"] > 0
    assert values["jaxlm_inter_token_latency_seconds_count"] > 0 and values["jaxlm_slots_in_use"] == 0


def test_chat_without_template_and_full_queue_over_http(hf_dir):
    """In process (starlette's test client): a model without a chat template, a queue of 0."""
    from starlette.testclient import TestClient

    from jaxlm.serve.app import create_app

    plain = jaxlm.load(hf_dir("GPT2LMHeadModel"))
    app = create_app(Engine(plain, max_batch=1, max_len=64, max_queue=0), model_name="m")
    http = TestClient(app)  # lifespan not run: the engine takes nothing off the queue
    r = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "--max-queue 0" in r.json()["error"]["message"]


def test_sigterm_finishes_requests_in_flight(model_dir, lm):
    """A server speculating with prompt lookup (its greedy text is plain greedy decoding's) drains
    on SIGTERM."""
    with serve(model_dir, "--max-batch", "4", "--draft", "prompt_lookup", "--speculate-k", "4") as (proc, url):
        body = {"model": "gpt2-chat", "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)  # one token out, 99 to go
            rest = [line for line in lines if line.startswith("data:")]
        assert proc.wait(60) == 0, proc.stderr.read()
    assert rest[-1] == "data: [DONE]"
    text = "".join(json.loads(x[5:])["choices"][0]["text"] for x in [first, *rest[:-1]])
    assert text == alone(lm, PROMPTS[0], dict(settings(0), max_tokens=100, temperature=0.0))[0]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def test_tensor_parallel_server_gives_the_one_device_text(model_dir, lm):
    # 2 slots of 32 tokens hold both prompts (< 8 tokens) and their 20 new tokens at once, and warm
    # up 2 prefill buckets instead of 128 tokens' 4; the one-device reference is the greedy program
    # of test_logprobs_stop_and_cancel.
    with serve(model_dir, "mesh.tensor=2", "--max-batch", "2", "--max-len", "32",
               env={"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {TEST_XLA_FLAGS}"}) as (_, url):
        r = client(url).completions.create(model="gpt2-chat", prompt=PROMPTS[:2], max_tokens=20, temperature=0)
    assert [c.text for c in r.choices] == [alone(lm, p, dict(settings(0), max_tokens=20, temperature=0.0))[0]
                                           for p in PROMPTS[:2]]
