"""SFT and DPO data and losses: chat rendering with learned-token flags, packing, the SFT loss
against cross-entropy computed directly, the DPO loss against its formula in float64, bad input."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import ModelConfig, build_model
from jaxlm.chat import render
from jaxlm.config import DataConfig
from jaxlm.instruct import ExampleError, Renderer, pack
from jaxlm.tokenizer import ByteTokenizer
from jaxlm.config import Config
from jaxlm.objectives.base import segments_from_eos
from jaxlm.objectives.clm import CLM
from jaxlm.objectives.dpo import DPO
from jaxlm.objectives.sft import SFT

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SMALL = dict(vocab_size=259, max_len=64, d_model=32, n_layers=2, n_heads=4, init_std=0.2)
CONFIGS = {"gpt2": ModelConfig.preset("gpt2-tiny", **SMALL),
           "rope-gqa": ModelConfig.preset("gpt2-tiny", **SMALL, norm="rmsnorm", positions="rope", n_kv_heads=2,
                                          activation="silu", use_bias=False, tie_embeddings=False)}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# Compiled once per model layout (eager calls would compile every operation for every length).
@nnx.jit
def forward(model, inputs, segments=None):
    return model(inputs, segment_ids=segments)


loss_sums_jit = nnx.jit(lambda model, batch, objective, second=None: objective.loss_sums(model, batch, second=second),
                        static_argnums=2)  # (model, batch, objective, fixed=the dpo reference)


def nll64(model, ids):
    """-log p(ids[t + 1] | ids[:t + 1]) for one sequence run alone, in float64: [len(ids) - 1].
    Right-padded to the model's context, so one compiled forward serves every length: a causal
    model's logits at the sequence's positions never see the positions after them."""
    n = len(ids) - 1
    inputs = np.zeros((1, model.config.context), np.int32)
    inputs[0, :n] = ids[:-1]
    logits = np.asarray(forward(model, jnp.asarray(inputs)), np.float64)[0, :n]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return -logp[np.arange(n), ids[1:]]


def test_chat_rendering_learns_exactly_the_assistant_turns():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"}]
    tok = ByteTokenizer()
    ids, learn = Renderer(tok, TEMPLATE).sft({"messages": messages}, "x line 1")
    assert ids[-1] == tok.eos_id and learn[-1]  # EOS ends the example, learned
    assert tok.decode(ids[:-1]) == render(TEMPLATE, messages, add_generation_prompt=False)
    assert tok.decode(ids[learn]) == "4<|end|>\n6<|end|>\n"
    # prompt / completion: the completion and EOS are learned, the prompt is not
    ids, learn = Renderer(tok, None).sft({"prompt": "1+1=", "completion": "2"}, "x line 2")
    assert list(ids) == list(b"1+1=2") + [tok.eos_id] and list(learn) == [False] * 4 + [True, True]


def test_chat_rendering_errors_name_file_and_line():
    r = Renderer(ByteTokenizer(), TEMPLATE)
    with pytest.raises(ExampleError, match=r"^f.jsonl line 3: role 'robot' is not one of system, user, assistant"):
        r.sft({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
              "f.jsonl line 3")
    with pytest.raises(ExampleError, match="line 4: no assistant message to learn"):
        r.sft({"messages": [{"role": "user", "content": "hi"}]}, "f.jsonl line 4")
    with pytest.raises(ExampleError, match="line 5: chat messages need a chat template"):
        Renderer(ByteTokenizer(), None).sft({"messages": [{"role": "assistant", "content": "x"}]}, "f.jsonl line 5")


def test_pack_best_fit_keeps_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(1, 60, 500))
    bins = pack(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 64
    assert len(bins) <= int(np.ceil(sum(lengths) / 64) * 1.1)  # within 10% of the lower bound
    assert bins == pack(lengths, 64)


@pytest.mark.parametrize("name", ["gpt2", "rope-gqa"])
def test_sft_loss_is_cross_entropy_over_learned_tokens_of_each_example_alone(tmp_path, name):
    rng = np.random.default_rng(1)
    examples = [{"prompt": "".join(rng.choice(list("abcdefgh "), rng.integers(3, 15))),
                 "completion": "".join(rng.choice(list("0123456789"), rng.integers(1, 9)))} for _ in range(12)]
    data = DataConfig(path=write_jsonl(tmp_path / "sft.jsonl", examples), seq_len=48, val_fraction=0.0)
    rows = SFT().rows(Config(data=data), "train", ByteTokenizer())
    assert rows.stats["rows"] < rows.stats["examples"]  # several examples share rows
    batch = {k: jnp.asarray(v) for k, v in rows.arrays.items()}
    model = build_model(CONFIGS[name])
    total, count, _ = loss_sums_jit(model, batch, SFT())

    renderer = Renderer(ByteTokenizer(), None)
    want_sum, want_count = 0.0, 0
    per_example = []
    for ex in examples[:-1]:  # the last one went to validation
        ids, learn = renderer.sft(ex, "")
        nll = nll64(model, ids)
        want_sum += (nll * learn[1:]).sum()
        want_count += learn[1:].sum()
        per_example.append(nll)
    assert float(count) == want_count
    np.testing.assert_allclose(float(total) / float(count), want_sum / want_count, rtol=1e-5)

    # Every packed example's token losses equal its losses alone (atol 1e-5).
    logits = np.asarray(forward(model, batch["inputs"], batch["segments"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    packed_nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    found = sorted((packed_nll[r][rows.arrays["segments"][r] == s].round(4).tolist()
                    for r in range(len(rows)) for s in range(1, rows.arrays["segments"][r].max() + 1)))
    assert len(found) == len(per_example)
    for got, want in zip(found, sorted(n.round(4).tolist() for n in per_example)):
        np.testing.assert_allclose(got, want, atol=1e-3)  # rounding to 1e-4 for matching; exact below
    r, s = 0, 1
    seg = rows.arrays["segments"][r] == s
    ids = np.concatenate([rows.arrays["inputs"][r][seg], rows.arrays["targets"][r][seg][-1:]])
    np.testing.assert_allclose(packed_nll[r][seg], nll64(model, ids), atol=1e-5)


def test_prompt_tokens_get_no_loss_and_no_gradient(tmp_path):
    examples = [{"prompt": "question %d:" % i, "completion": "answer %d" % i} for i in range(6)]
    data = DataConfig(path=write_jsonl(tmp_path / "sft.jsonl", examples), seq_len=64, val_fraction=0.0)
    rows = SFT().rows(Config(data=data), "train", ByteTokenizer())
    batch = {k: jnp.asarray(v) for k, v in rows.arrays.items()}
    model = build_model(CONFIGS["gpt2"])
    base = float(loss_sums_jit(model, batch, SFT())[0])
    prompt = (rows.arrays["weights"] == 0) & (rows.arrays["segments"] > 0)
    targets = np.where(prompt, (rows.arrays["targets"] + 7) % 256, rows.arrays["targets"])
    moved = float(loss_sums_jit(model, {**batch, "targets": jnp.asarray(targets)}, SFT())[0])
    assert moved == base  # exactly: prompt targets take no part in the loss
    learned = rows.arrays["weights"] > 0
    targets = np.where(learned, (rows.arrays["targets"] + 7) % 256, rows.arrays["targets"])
    assert float(loss_sums_jit(model, {**batch, "targets": jnp.asarray(targets)}, SFT())[0]) != base


@pytest.mark.parametrize("name", ["gpt2", "rope-gqa"])
def test_clm_segments_from_eos_equal_each_document_alone(name):
    cfg = CONFIGS[name]
    eos = ByteTokenizer.eos_id
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 256, n) for n in (9, 14, 6)]
    row = np.concatenate([docs[0], [eos], docs[1], [eos], docs[2], [eos], rng.integers(0, 256, 3)])[None]
    model = build_model(cfg)
    spec = CLM(segments_eos=eos)
    total, count, _ = loss_sums_jit(model, jnp.asarray(row), spec)
    inputs = row[:, :-1]
    segments = np.asarray(segments_from_eos(jnp.asarray(inputs), eos))
    want = 0.0
    for s in np.unique(segments):  # each segment (EOS first, as its BOS) run alone
        ids = np.concatenate([inputs[0][segments[0] == s], row[0, 1:][segments[0] == s][-1:]])
        want += nll64(model, ids).sum()
    assert float(count) == inputs.shape[1]
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert abs(float(loss_sums_jit(model, jnp.asarray(row), CLM())[0]) - want) > 1e-3  # eos packing differs


def test_dpo_loss_equals_formula_in_float64(tmp_path):
    rng = np.random.default_rng(3)
    word = lambda n: "".join(rng.choice(list("abcdefghij"), n))  # noqa: E731
    pairs = [{"prompt": word(rng.integers(2, 10)), "chosen": word(rng.integers(1, 12)),
              "rejected": word(rng.integers(1, 12))} for _ in range(9)]
    data = DataConfig(path=write_jsonl(tmp_path / "dpo.jsonl", pairs), seq_len=32, val_fraction=0.0)
    rows = DPO(0.1, 0.0).rows(Config(data=data), "train", ByteTokenizer())
    batch = {k: jnp.asarray(v) for k, v in rows.arrays.items()}
    assert batch["inputs"].shape == (8, 2, 32)
    cfg = CONFIGS["rope-gqa"]
    policy, reference = build_model(cfg, seed=0), build_model(cfg, seed=1)
    beta = 0.3
    total, n, stats = loss_sums_jit(policy, batch, DPO(beta, sft_weight=0.0), second=reference)

    renderer = Renderer(ByteTokenizer(), None)
    losses, margins, chosen_nll = [], [], []
    for ex in pairs[:-1]:
        logps = []
        for model in (policy, reference):
            for ids, learn in renderer.dpo(ex, ""):
                logps.append(-(nll64(model, ids) * learn[1:]).sum())
        pc, pr, rc, rr = logps
        m = beta * ((pc - rc) - (pr - rr))
        losses.append(np.log1p(np.exp(-m)))  # -log sigmoid(m)
        margins.append(m)
        chosen_nll.append(-pc / renderer.dpo(ex, "")[0][1][1:].sum())
    assert float(n) == 8
    np.testing.assert_allclose(float(total) / float(n), np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(float(stats["reward_margin"][0]) / 8, np.mean(margins), rtol=1e-4, atol=1e-6)
    assert float(stats["reward_accuracy"][0]) == sum(m > 0 for m in margins)
    # RPO: + sft_weight x the chosen response's mean token NLL
    rpo, _, _ = loss_sums_jit(policy, batch, DPO(beta, sft_weight=0.5), second=reference)
    np.testing.assert_allclose(float(rpo) / 8, np.mean(np.array(losses) + 0.5 * np.array(chosen_nll)), rtol=1e-5)
    # The reference is the policy: every pair's loss is log 2.
    same, _, _ = loss_sums_jit(policy, batch, DPO(beta, sft_weight=0.0), second=policy)
    np.testing.assert_allclose(float(same) / 8, np.log(2), rtol=1e-6)


def run_train(argv, capsys):
    """`jaxlm train ARGV` in this process (it stops on the data, before anything needs a process of
    its own): exit code, stderr. An uncaught exception fails the test where it is raised."""
    from jaxlm.cli import main

    capsys.readouterr()
    code = main(["train", *map(str, argv)])
    return code, capsys.readouterr().err


BAD = {
    "no_fields": ("sft", [{"prompt": "a"}], [],
                  r'bad\.jsonl line 2: an sft example needs "messages" \(a list\) or "prompt" and "completion"'),
    "role": ("sft", [{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}],
             ["data.chat_template={template}"], r"bad\.jsonl line 2: role 'wizard' is not one of"),
    "no_rejected": ("dpo", [{"prompt": "a", "chosen": "b"}], ["adapt.init={model}"],
                    r"""bad\.jsonl line 2: a dpo example needs "chosen" and "rejected".* it lacks 'rejected'"""),
    "no_template": ("sft", [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
                    [], r"bad\.jsonl line 2: chat messages need a chat template, and the tokenizer has none; "
                        r"set data.chat_template=FILE\.jinja"),
    "too_long": ("sft", [{"prompt": "x" * 100, "completion": "y"}] * 3, [],
                 r"no train examples of .*bad\.jsonl fit data\.seq_len=32 \(3 longer, 0 with nothing to learn\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_examples_one_line_exit_2(tmp_path, tiny_byte_model, case, capsys):
    objective, bad, extra, message = BAD[case]
    good = {"prompt": "q", "completion": "a"} if objective == "sft" else {"prompt": "q", "chosen": "a", "rejected": "b"}
    lines = [good, *bad] if case != "too_long" else [{"prompt": "x" * 100, "completion": "y"}, *bad]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    extra = [e.format(template=tmp_path / "t.jinja", model=tiny_byte_model) for e in extra]
    code, err = run_train([f"train.objective={objective}", f"data.path={path}", "data.seq_len=32", "data.batch_size=8",
                           "train.steps=1", f"train.workdir={tmp_path / 'run'}", "data.val_fraction=0", *extra], capsys)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith("jaxlm train: error: ")
    assert re.search(message, last), last


def test_docstring_tasks_are_real_functions_split_by_file(tmp_path):
    from jaxlm.data import default_corpus_files
    from jaxlm.instruct import docstring_tasks

    # The first 500 of the ~1,800 standard-library files (the demo script uses them all).
    counts = docstring_tasks(tmp_path, max_chars=320, val_fraction=0.05, files=default_corpus_files()[:500])
    assert counts["sft_train"] > 300 and counts["sft_validation"] > 30
    sft = [json.loads(x) for x in (tmp_path / "sft" / "validation.jsonl").read_text().splitlines()]
    dpo = [json.loads(x) for x in (tmp_path / "dpo" / "validation.jsonl").read_text().splitlines()]
    assert counts["dpo_validation"] > 0.5 * counts["sft_validation"]
    completions = {ex["prompt"]: ex["completion"] for ex in sft}
    for pair in dpo:
        assert pair["chosen"] == completions[pair["prompt"]] != pair["rejected"]
        assert sorted(pair["chosen"].splitlines()) == sorted(pair["rejected"].splitlines())  # same lines, reordered
        compile(pair["prompt"] + pair["chosen"], "<chosen>", "exec")
        with pytest.raises(SyntaxError):  # the rejected order is broken code
            compile(pair["prompt"] + pair["rejected"], "<rejected>", "exec")
    for ex in sft:
        assert ex["prompt"].lstrip().startswith(("def ", "async def ")) and len(ex["prompt"] + ex["completion"]) <= 320
    parsed = 0
    for ex in sft:
        try:
            compile(ex["prompt"] + ex["completion"], "<task>", "exec")
            parsed += 1
        except SyntaxError:  # blank lines inside a body's string literal were dropped
            pass
    assert parsed >= 0.95 * len(sft)
    train_prompts = {json.loads(x)["prompt"] for x in (tmp_path / "sft" / "train.jsonl").read_text().splitlines()}
    assert len(train_prompts & {ex["prompt"] for ex in sft}) < 0.1 * len(sft)  # held-out files, few shared defs


def test_soft_prompt_models_train_on_padded_rows(tmp_path):
    """Prompt tuning cannot pack (examples would share the prompt): with data.packing=pad the row's
    segment ids act as its padding mask, and the loss is each example's alone, prompt included."""
    examples = [{"prompt": "q%d " % i * (i + 1), "completion": "a%d" % i} for i in range(5)]
    data = DataConfig(path=write_jsonl(tmp_path / "sft.jsonl", examples), seq_len=32, val_fraction=0.0,
                      packing="pad")
    rows = SFT().rows(Config(data=data), "train", ByteTokenizer())
    model = build_model(CONFIGS["gpt2"].replace(prompt_length=3))
    total, count, _ = loss_sums_jit(model, {k: jnp.asarray(v) for k, v in rows.arrays.items()}, SFT())
    renderer = Renderer(ByteTokenizer(), None)
    want = sum((nll64(model, ids) * learn[1:]).sum() for ids, learn in (renderer.sft(ex, "") for ex in examples[:-1]))
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


def test_dpo_whole_conversations_with_a_string_prompt():
    """The UltraFeedback layout: "prompt" a string, "chosen" / "rejected" whole conversations."""
    r = Renderer(ByteTokenizer(), TEMPLATE)
    user = {"role": "user", "content": "2+2?"}
    (c_ids, c_learn), (r_ids, r_learn) = r.dpo({"prompt": "2+2?", "chosen": [user, {"role": "assistant", "content": "4"}],
                                                "rejected": [user, {"role": "assistant", "content": "5"}]}, "x line 1")
    tok = ByteTokenizer()
    assert tok.decode(c_ids[c_learn]) == "4<|end|>\n" and tok.decode(r_ids[r_learn]) == "5<|end|>\n"
    assert tok.decode(c_ids[~c_learn]) == "<|user|>2+2?<|end|>\n<|assistant|>"
