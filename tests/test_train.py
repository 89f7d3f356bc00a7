"""Training: exact resume, preemption, gradient accumulation, MLM masking, learning, bad input."""

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.cli import DEFAULT_CONFIG
from jaxlm.config import OptimConfig, load_config
from jaxlm.data import stdlib_dir
from jaxlm.optim import make_optimizer, schedule
from jaxlm.objectives.clm import CLM
from jaxlm.objectives.mlm import mlm_inputs
from jaxlm.train import StepSpec, make_train_step, train
from jaxlm.transformer import build_model

TINY = ["model=gpt2-tiny", "model.vocab_size=259", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.max_len=32", "data.seq_len=32", "data.batch_size=8", "train.log_every=1",
        "train.eval_batches=2", "optim.warmup_steps=2"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small local text corpus (40 standard-library modules) and a shared data dir."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "text"
    src.mkdir()
    for f in sorted(stdlib_dir().glob("*.py"))[:40]:
        shutil.copy(f, src / f.name)
    return {"path": str(src), "data_dir": str(root / "cache")}


def args(corpus, workdir, *extra):
    return [*TINY, f"data.path={corpus['path']}", f"data.data_dir={corpus['data_dir']}",
            f"train.workdir={workdir}", *extra]


# `jaxlm train` with one more hook: SIGKILL right after the checkpoint of step N is on disk.
KILL_AFTER_SAVE = """
import os, signal, sys
from jaxlm.cli import DEFAULT_CONFIG
from jaxlm.config import load_config
from jaxlm.train import Hook, train

def kill(info):
    info.run.checkpoints.wait()
    os.kill(os.getpid(), signal.SIGKILL)

train(load_config(DEFAULT_CONFIG, sys.argv[2:]), hooks=[Hook(kill, every=int(sys.argv[1]), at_end=False)])
"""


def losses(workdir):
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        d = json.loads(line)
        if "loss" in d:
            out[d["step"]] = d["loss"]
    return out


RESUME = ["train.steps=8", "train.save_every=4", "train.eval_every=0", "model.dropout=0.1"]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """An 8-step run with checkpoints at steps 4 and 8, not disturbed: the reference for resumes."""
    w = tmp_path_factory.mktemp("uninterrupted") / "w"
    train(load_config(DEFAULT_CONFIG, args(corpus, w, *RESUME)), log=lambda m: None)
    return w


def test_exact_resume_after_sigkill(corpus, uninterrupted, tmp_path):
    common = RESUME
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_SAVE, "4", *args(corpus, tmp_path / "cut", *common)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(losses(tmp_path / "cut")) == [1, 2, 3, 4]
    said = []  # resumed in this process: a fresh one costs seconds of imports
    train(load_config(DEFAULT_CONFIG, args(corpus, tmp_path / "cut", *common)), log=said.append)
    assert any(m.startswith("resumed from") for m in said), said
    a, b = losses(uninterrupted), losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]  # bitwise identical


def test_mixture_resumes_exactly_after_sigkill(tmp_path):
    """data.mixture of three sources (0.5 / 0.3 / 0.2): killed after step 4's checkpoint and resumed,
    steps 5-8 log the uninterrupted run's losses bitwise (mixing and packing restored together)."""
    files = sorted(stdlib_dir().glob("*.py"))
    parts = []
    for j, (a, b) in enumerate([(0, 12), (12, 20), (20, 30)]):
        (tmp_path / f"s{j}").mkdir()
        for f in files[a:b]:
            shutil.copy(f, tmp_path / f"s{j}" / f.name)
        parts.append(f"{tmp_path / f's{j}'}:{[0.5, 0.3, 0.2][j]}")
    corpus = {"path": "", "data_dir": str(tmp_path / "cache")}
    common = [*RESUME, f"data.mixture={','.join(parts)}", "data.path="]
    train(load_config(DEFAULT_CONFIG, args(corpus, tmp_path / "whole", *common)), log=lambda m: None)
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_SAVE, "4", *args(corpus, tmp_path / "cut", *common)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(losses(tmp_path / "cut")) == [1, 2, 3, 4]
    said = []
    train(load_config(DEFAULT_CONFIG, args(corpus, tmp_path / "cut", *common)), log=said.append)
    assert any(m.startswith("resumed from") for m in said), said
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 9)) and [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]


@contextlib.contextmanager
def file_size_limit():
    """Lets a hook set RLIMIT_FSIZE (writes past it fail with EFBIG, as on a full disk); restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield lambda nbytes: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's aftermath
def test_full_disk_at_a_save_stops_in_one_line_and_the_rerun_resumes_exactly(corpus, uninterrupted, tmp_path):
    from jaxlm.io import TrainCheckpoints, checksums
    from jaxlm.train import Hook

    w = tmp_path / "w"
    with file_size_limit() as limit:
        def fill_disk(info):  # once the checkpoint of step 4 is on disk, no file may exceed 64 KiB
            info.run.checkpoints.wait()
            limit(64 << 10)

        with pytest.raises(OSError, match=rf"^could not write the checkpoint of step 8 to {w}/checkpoints: File too "
                                          "large; the checkpoint of step 4 is intact: free space, then run again "
                                          "to resume from it$"):
            train(load_config(DEFAULT_CONFIG, args(corpus, w, *RESUME)), log=lambda m: None,
                  hooks=[Hook(fill_disk, every=5, at_end=False)])
    ckpts = TrainCheckpoints(w)
    assert ckpts.all_steps() == [4] and checksums.verify(w / "checkpoints" / "4") is True
    ckpts.close()
    logs = []
    train(load_config(DEFAULT_CONFIG, args(corpus, w, *RESUME)), log=logs.append)  # with room again
    assert any(m.endswith("resumed from " + str(w / "checkpoints" / "4")) for m in logs), logs
    assert losses(w) == losses(uninterrupted)  # bitwise, steps 1-8


def flip_a_byte(checkpoint):
    """Flip one byte in the middle of the largest array file of a checkpoint (a bad copy)."""
    f = max((p for p in checkpoint.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return f


def test_damaged_checkpoint_is_set_aside_and_training_resumes_from_the_one_before(corpus, uninterrupted, tmp_path,
                                                                                 capsys):
    """orbax reads flipped bytes back as wrong numbers; the checksums sealed into every checkpoint
    catch them: training falls back to the previous checkpoint (bitwise-equal losses), loading
    names the file, and with no earlier checkpoint training stops naming it."""
    import jaxlm
    from jaxlm.cli import main
    from jaxlm.io.checksums import DamagedError

    w = tmp_path / "w"
    shutil.copytree(uninterrupted, w)
    bad = flip_a_byte(w / "checkpoints" / "8")
    name = bad.relative_to(w / "checkpoints" / "8")
    with pytest.raises(DamagedError, match=rf"^{bad} is damaged \(its SHA-256 differs\)"):
        jaxlm.load(w)
    capsys.readouterr()
    assert main(["generate", str(w), "--prompt", "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"jaxlm generate: error: {bad} is damaged"), err
    logs = []
    train(load_config(DEFAULT_CONFIG, args(corpus, w, *RESUME)), log=logs.append)
    warning = [m for m in logs if m.startswith("warning:")]
    assert len(warning) == 1 and warning[0].startswith(f"warning: checkpoint of step 8 is damaged ({name}: its "
                                                       "SHA-256 differs); moved it to "), logs
    assert warning[0].endswith("and resuming from the checkpoint of step 4")
    assert [p.name.split("-")[0] for p in (w / "damaged").iterdir()] == ["8"]  # kept, not deleted
    assert losses(w) == losses(uninterrupted)  # bitwise, steps 1-8
    assert jaxlm.load(w) is not None  # the new step 8 is sound
    only = tmp_path / "only"  # the damaged checkpoint is the only one: stop, naming it
    shutil.copytree(uninterrupted, only)
    shutil.rmtree(only / "checkpoints" / "4")
    bad = flip_a_byte(only / "checkpoints" / "8")
    with pytest.raises(ValueError, match=rf"^{bad} is damaged .*; it is the only checkpoint in {only}/checkpoints: "
                                         "restore the file from a copy, or use another train.workdir$"):
        train(load_config(DEFAULT_CONFIG, args(corpus, only, *RESUME)), log=lambda m: None)
    assert (only / "checkpoints" / "8").is_dir()


def test_sigterm_saves_current_step_and_exits_0(corpus, tmp_path):
    argv = args(corpus, tmp_path / "w", "train.steps=100000", "train.save_every=100000", "train.eval_every=0")
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "train", *argv], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = tmp_path / "w" / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    steps = sorted(int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == max(losses(tmp_path / "w"))


def test_incomplete_checkpoint_is_ignored(corpus, uninterrupted, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(uninterrupted, w)
    # A save cut off mid-write leaves orbax's temporary directory behind (here: step 8's).
    os.rename(w / "checkpoints" / "8", w / "checkpoints" / "8.orbax-checkpoint-tmp-1234")
    logs = []
    train(load_config(DEFAULT_CONFIG, args(corpus, w, *RESUME)), log=logs.append)
    assert any(m.endswith("resumed from " + str(w / "checkpoints" / "4")) for m in logs), logs
    assert losses(w) == losses(uninterrupted)


def test_a_second_run_of_the_same_setup_traces_and_compiles_nothing(corpus, tmp_path):
    """Runs of one setup in a process (a resumed run, a sweep in a notebook) share its jitted
    programs: the second traces and compiles none of them, and logs the first's losses."""
    events = []

    def listen(event, seconds, **kw):
        events.append(event)

    def run(w):
        train(load_config(DEFAULT_CONFIG, args(corpus, w, "train.steps=3", "train.eval_every=2")), log=lambda m: None)

    run(tmp_path / "a")
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        run(tmp_path / "b")
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert "/jax/core/compile/backend_compile_duration" not in events, events
    assert "/jax/core/compile/jaxpr_trace_duration" not in events, events
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 3


def test_grad_accumulation_equals_big_batch():
    cfg = load_config(None, TINY).model
    params = nnx.to_pure_dict(nnx.state(build_model(cfg.replace(scan_layers=True)), nnx.Param))
    graphdef = nnx.graphdef(build_model(cfg.replace(scan_layers=True)))
    # SGD: the update is -lr * gradient. (Adam divides by |g|, which turns the rounding noise of a
    # zero gradient, e.g. of the attention key bias, into a full-size step.)
    opt = OptimConfig(name="sgd", lr=1e-1, warmup_steps=0, clip_norm=0)
    tx = make_optimizer(opt, 10)
    batch = jnp.asarray(np.random.RandomState(0).randint(0, 259, (8, 33)), jnp.int32)
    outs = []
    for k in (1, 4):
        # Without dropout: its masks are drawn per micro-batch, so they differ by construction.
        step = make_train_step(graphdef, tx, StepSpec(CLM(), grad_accum=k), schedule(opt, 10), dropout=False)
        state = {"params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params), "step": jnp.int32(0)}
        outs.append(step(state, batch))
    (s1, m1), (s4, m4) = outs
    assert abs(float(m1["loss"]) - float(m4["loss"])) <= 1e-6
    assert abs(float(m1["grad_norm"]) - float(m4["grad_norm"])) <= 1e-6
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_mlm_masking_statistics():
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (64, 4096)))
    tokens = tokens.at[:, :16].set(256)  # special tokens are never selected
    inputs, selected = mlm_inputs(tokens, jax.random.key(0), vocab_size=259, mask_id=258, prob=0.15,
                                  special_ids=(256,))
    inputs, selected, tokens = map(np.asarray, (inputs, selected, tokens))
    assert not selected[:, :16].any()
    rate = selected[:, 16:].mean()
    masked = (inputs == 258)[selected].mean()
    same = (inputs == tokens)[selected].mean()
    random_ = 1 - masked - same
    print(f"selected {rate:.4f}, [MASK] {masked:.4f}, random {random_:.4f}, unchanged {same:.4f}")
    assert abs(rate - 0.15) < 0.01 * 0.15 * 10  # within 1.5 points of 15% over 260k tokens
    assert abs(masked - 0.8) < 0.01 and abs(same - 0.1 - 0.1 / 259) < 0.01 and abs(random_ - 0.1) < 0.01
    assert (inputs[~selected] == tokens[~selected]).all()


def test_bert_mlm_accuracy_rises(corpus, tmp_path):
    argv = ["model=bert-tiny", "model.vocab_size=259", "model.d_model=64", "model.n_layers=2",
            "model.n_heads=2", "model.max_len=64", "model.dropout=0", "model.attention_dropout=0",
            "data.seq_len=64", "data.batch_size=16", "train.objective=mlm", "train.steps=30",
            "train.eval_every=30", "train.save_every=30", "train.eval_batches=4", "optim.lr=3e-3",
            "optim.warmup_steps=5", f"data.path={corpus['path']}", f"data.data_dir={corpus['data_dir']}",
            f"train.workdir={tmp_path / 'bert'}"]
    train(load_config(None, argv), log=lambda m: None)
    evals = [json.loads(x) for x in open(tmp_path / "bert" / "metrics.jsonl") if "val_loss" in x]
    print(evals)
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30  # loss 5.7 -> 3.0, accuracy 0 -> 0.34
    assert evals[-1]["val_accuracy"] > evals[0]["val_accuracy"] + 0.1
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0


def test_gpt_learns_and_generates(corpus, tmp_path):
    import jaxlm

    w = tmp_path / "gpt"
    last = train(load_config(None, args(corpus, w, "train.steps=40", "train.eval_every=40", "optim.lr=3e-3",
                                        "train.save_every=40")), log=lambda m: None)
    first = json.loads(open(w / "metrics.jsonl").readline())
    assert first["step"] == 0 and abs(first["val_loss"] - math.log(259)) < 0.3
    assert last["val_loss"] < first["val_loss"] - 2.0
    lm = jaxlm.load(w)
    assert lm.config.eos_token_id == 256
    # The trained model generates: cached greedy decoding gives the argmax of the full forward at
    # every step, and the text is those bytes up to EOS.
    seq = lm.tokenizer.encode("def ")
    for _ in range(8):
        seq.append(int(np.argmax(np.asarray(lm.logits([seq]))[0, -1])))
    new = seq[4:]
    want = new[:new.index(256)] if 256 in new else new
    assert lm.generate(["def "], max_new_tokens=8)[0] == lm.tokenizer.decode(want)
    assert np.asarray(lm.generate([seq[:4]], max_new_tokens=8))[0, 4:4 + len(want)].tolist() == want
    # jaxlm eval on the workdir reproduces the run's own last validation loss (same rows).
    from jaxlm.report import evaluate_model, plot_losses

    ev = evaluate_model(w, batches=2)
    assert abs(ev["loss"] - last["val_loss"]) < 1e-5 and abs(ev["perplexity"] - math.exp(ev["loss"])) < 1e-9
    assert plot_losses(w).stat().st_size > 10_000
    assert any(p.name.startswith("events.out.tfevents") for p in (w / "tensorboard").iterdir())


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny", "gemma-tiny",
                                    "gemma2-tiny"])
def test_decoder_families_learn(corpus, tmp_path, preset):
    """30 steps of each Llama-layout family (rows of 32 past Mistral's and Gemma 2's 16-token windows)."""
    w = tmp_path / preset
    train(load_config(None, args(corpus, w, f"model={preset}", "train.steps=30", "train.eval_every=30",
                                 "train.save_every=30", "optim.lr=3e-3", "mesh.data=1")), log=lambda m: None)
    evals = [json.loads(x) for x in open(w / "metrics.jsonl") if "val_loss" in x]
    print(preset, [round(e["val_loss"], 3) for e in evals])
    assert [e["step"] for e in evals] == [0, 30] and evals[1]["val_loss"] < evals[0]["val_loss"] - 1.0


@pytest.mark.parametrize("extra, message", [
    (["data.path=/nonexistent/corpus"], "data path /nonexistent/corpus does not exist"),
    (["train.stepz=3"], r"unknown config key train.stepz \(did you mean 'train.steps'\?\)"),
    (["model.n_layer=3"], r"unknown config key model.n_layer \(did you mean 'model.n_layers'\?\)"),
    (["optim.grad_accum=3"], "data.batch_size=8 is not divisible by optim.grad_accum=3"),
    (["data.seq_len=40"], r"data.seq_len=40 exceeds the model's context of 32 tokens \(model.max_len, less"),
    (["model.prompt_length=4"], "data.seq_len=32 exceeds the model's context of 28 tokens"),
    (["model.vocab_size=200"], "the tokenizer has 259 tokens but model.vocab_size=200; set model.vocab_size=259"),
])
def test_bad_input_one_line(cli, corpus, tmp_path, extra, message):
    proc = cli("train", *args(corpus, tmp_path / "w", *extra))
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith("WARNING")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    import re
    assert re.search(message, lines[0]), lines[0]


def test_empty_data_and_incompatible_workdir(corpus, uninterrupted, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="the data files hold no text"):
        train(load_config(None, args(corpus, tmp_path / "w0", f"data.path={tmp_path / 'empty'}")), log=lambda m: None)
    w = tmp_path / "w"
    shutil.copytree(uninterrupted, w)
    before = sorted(p.name for p in (w / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"holds a checkpoint of a different model \(model.d_model: 32 there, 48 now\)"):
        train(load_config(None, args(corpus, w, "train.steps=12", "model.d_model=48")), log=lambda m: None)
    assert sorted(p.name for p in (w / "checkpoints").iterdir()) == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    from jaxlm.train import TrainingError

    w = tmp_path / "w"
    train(load_config(None, args(corpus, w, "train.steps=2", "train.eval_every=0")), log=lambda m: None)
    with pytest.raises(TrainingError, match=r"loss became nan at step 4; stopped. The last good checkpoint is step 2"):
        train(load_config(None, args(corpus, w, "train.steps=6", "train.eval_every=0", "optim.lr=1e38",
                                     "optim.warmup_steps=0")), log=lambda m: None)
    assert sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    with pytest.raises(ValueError, match="does not match this run's optimizer state"):
        train(load_config(None, args(corpus, w, "train.steps=4", "optim.clip_norm=0")), log=lambda m: None)


def test_trains_with_gpt2_bpe_tokenizer(corpus, tmp_path):
    from jaxlm.testing import gpt2_tokenizer_files

    tok = tmp_path / "tok"
    tok.mkdir()
    for name, src in gpt2_tokenizer_files().items():
        shutil.copy(src, tok / name)
    argv = args(corpus, tmp_path / "w", "model.vocab_size=50257", f"data.tokenizer={tok}", "train.steps=3",
                "train.eval_every=3", "train.save_every=3")
    last = train(load_config(None, argv), log=lambda m: None)
    first = json.loads(open(tmp_path / "w" / "metrics.jsonl").readline())
    assert abs(first["val_loss"] - math.log(50257)) < 0.5 and last["val_loss"] < first["val_loss"]
    import jaxlm

    lm = jaxlm.load(tmp_path / "w")
    assert lm.config.eos_token_id == 50256 and lm.tokenizer.encode("def f():") == [4299, 277, 33529]


CHAT = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_data(tmp_path, n=64):
    """Chat examples (sums to learn) as JSONL, one longer than data.seq_len=48, and a template file."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(n):
        a, b = rng.integers(0, 50, 2)
        lines.append({"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": f"{a + b}"}]})
    lines.append({"messages": [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y"}]})
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "chat.jinja").write_text(CHAT)
    return [f"data.path={tmp_path / 'chat.jsonl'}", f"data.chat_template={tmp_path / 'chat.jinja'}"]


def test_sft_lora_on_a_mesh_resumes_exactly(tmp_path, tiny_byte_model, cli):
    common = ["train.objective=sft", f"adapt.init={tiny_byte_model}", "adapt.method=lora", "adapt.lora_targets=q,v,up",
              *chat_data(tmp_path), "data.seq_len=48", "data.batch_size=8", "mesh.data=2", "mesh.fsdp=2",
              "mesh.tensor=2", "train.steps=6", "train.save_every=3", "train.eval_every=3", "train.log_every=1",
              "optim.lr=1e-2", "optim.warmup_steps=0"]
    # The runs that are not killed run in this process (on its 8 simulated devices): a fresh one
    # costs seconds of imports.
    full = cli("train", *common, f"train.workdir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    assert "skipped 1 longer than data.seq_len" in full.stderr  # skipped and counted, never truncated
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_SAVE, "3", *common, f"train.workdir={tmp_path / 'cut'}"],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = cli("train", *common, f"train.workdir={tmp_path / 'cut'}")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [a[s] for s in range(4, 7)] == [b[s] for s in range(4, 7)]  # bitwise identical
    assert a[6] < a[1]
    # The run carries its chat template, so jaxlm serve / lm.generate see the one it trained with.
    from jaxlm import load

    assert load(tmp_path / "full").tokenizer.chat_template == CHAT


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_starts_at_log2_and_prefers_chosen(tmp_path, tiny_byte_model, method, cli):
    """Step 1: the policy is its reference (a copy, or the base with adapters off): every pair's loss
    is log 2 and the margin 0. Training on pairs where the right sum is chosen raises the margin."""
    rng = np.random.default_rng(1)
    pairs = []
    for _ in range(80):
        a, b = rng.integers(0, 50, 2)
        pairs.append({"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b + rng.integers(1, 9)}"})
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    w = tmp_path / "w"
    proc = cli("train", "train.objective=dpo", f"adapt.init={tiny_byte_model}", f"adapt.method={method}",
               f"data.path={tmp_path / 'dpo.jsonl'}", "data.seq_len=16", "data.batch_size=8", "train.steps=20",
               "train.eval_every=20", "train.log_every=1", "optim.lr=3e-3", "optim.warmup_steps=0",
               "dpo.beta=0.5", f"train.workdir={w}")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in open(w / "metrics.jsonl")]
    first = next(x for x in lines if x["step"] == 1 and "loss" in x)
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["reward_margin"] == 0.0
    last = [x for x in lines if "loss" in x][-5:]
    assert np.mean([x["reward_margin"] for x in last]) > 0 and np.mean([x["loss"] for x in last]) < math.log(2)
    val = [x for x in lines if "val_reward_accuracy" in x]
    assert {"val_reward_margin", "val_chosen_loss"} <= set(val[-1])


def test_one_writer_per_workdir_and_a_dead_runs_lock_is_taken_over(corpus, tmp_path, cli):
    import socket

    common = ["train.save_every=100000", "train.eval_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "train",
                             *args(corpus, tmp_path / "w", "train.steps=100000", *common)],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
                (tmp_path / "w" / "metrics.jsonl").is_file()
                and len((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()) >= 2):
            time.sleep(0.2)
        second = cli("train", *args(corpus, tmp_path / "w", "train.steps=5", *common))  # in this process
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"jaxlm train: error: {tmp_path / 'w'} is in use by a running jaxlm train (host {socket.gethostname()} "
            f"pid {proc.pid}); wait for it to finish, stop it, or use another train.workdir")
        assert proc.poll() is None  # the running one goes on
    finally:
        proc.kill()  # SIGKILL: no chance to release; the kernel drops the lock
        proc.wait()
    third = cli("train", *args(corpus, tmp_path / "w", "train.steps=3", *common))
    assert third.returncode == 0, third.stderr
    assert f"took over the workdir lock left by host {socket.gethostname()} pid {proc.pid}" in third.stderr
    assert sorted(losses(tmp_path / "w")) == [1, 2, 3]


def test_workdir_lock_is_released_when_training_fails(corpus, tmp_path):
    from jaxlm.io.lock import WorkdirLock
    from jaxlm.train import Hook

    def boom(info):
        raise RuntimeError("a hook failed")

    cfg = load_config(None, args(corpus, tmp_path / "w", "train.steps=3", "train.eval_every=0"))
    with pytest.raises(RuntimeError, match="a hook failed"):
        train(cfg, log=lambda m: None, hooks=[Hook(boom, every=1)])
    WorkdirLock(tmp_path / "w").release()  # free again: a later run in this process may take it
