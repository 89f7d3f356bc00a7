"""Sequence classification: labeled data, the decoder's last-token head, metrics, fine-tuning."""

import json

import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm import ModelConfig, build_model
from jaxlm.api import LM
from jaxlm.classify import label_names, macro_f1, package_task, read_examples
from jaxlm.config import DataConfig, load_config


def test_macro_f1_matches_the_definition():
    confusion = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 0]])  # rows: true class; class 2 never occurs
    f1 = []
    for c in range(2):
        tp, fp, fn = confusion[c, c], confusion[:, c].sum() - confusion[c, c], confusion[c].sum() - confusion[c, c]
        f1.append(2 * tp / (2 * tp + fp + fn))
    assert macro_f1(confusion) == pytest.approx(np.mean(f1))


def test_labeled_files(tmp_path):
    d = tmp_path / "task"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n" for i in range(9)))
    (d / "validation.jsonl").write_text(json.dumps({"text": "v", "label": 2}) + "\n")
    assert read_examples(DataConfig(path=str(d)), "validation") == [("v", 2)]
    assert label_names(read_examples(DataConfig(path=str(d)), "train")) == ("0", "1", "2")
    csv = tmp_path / "one.csv"
    csv.write_text("text,label\n" + "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n" for i in range(200)))
    train, val = (read_examples(DataConfig(path=str(csv), val_fraction=0.2), s) for s in ("train", "validation"))
    assert len(train) + len(val) == 200 and 20 < len(val) < 60  # split by a hash of the text
    assert not {t for t, _ in train} & {t for t, _ in val}
    with pytest.raises(ValueError, match="lacks column 'sentence'"):
        read_examples(DataConfig(path=str(csv), text_key="sentence"), "train")


def test_package_task(tmp_path):
    info = package_task(tmp_path)
    assert info["train"] > 1000 and info["validation"] > 200 and len(info["labels"]) == 9
    rows = [json.loads(x) for x in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert {r["label"] for r in rows} == set(info["labels"])


def test_decoder_head_reads_the_last_real_token():
    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=96, max_len=32, d_model=32, n_layers=2, n_heads=4,
                             head="classify", num_labels=3, init_std=0.2)
    lm = LM(cfg, nnx.to_pure_dict(nnx.state(build_model(cfg), nnx.Param)))
    row = np.arange(1, 8)
    alone = np.asarray(lm.logits(row[None]))
    right = np.asarray(lm.logits(np.concatenate([row, [0, 0, 0]])[None], np.array([[1] * 7 + [0] * 3])))
    left = np.asarray(lm.logits(np.concatenate([[0, 0, 0], row])[None], np.array([[0] * 3 + [1] * 7])))
    assert alone.shape == (1, 3)
    np.testing.assert_allclose(right, alone, atol=1e-5)
    np.testing.assert_allclose(left, alone, atol=1e-5)
    with pytest.raises(ValueError, match="generate\\(\\) needs a language-model head"):
        lm.generate([[1, 2]], max_new_tokens=2)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "bert-tiny"])
def test_fine_tuning_learns_a_separable_task(tmp_path, preset):
    from jaxlm.report import evaluate_model
    from jaxlm.train import train

    rng = np.random.RandomState(0)
    task = tmp_path / "task"
    task.mkdir()
    for split, n in (("train", 96), ("validation", 32)):
        rows = []
        for i in range(n):
            label = i % 2
            letters = "abcdefghijklm" if label == 0 else "nopqrstuvwxyz"
            rows.append({"text": "".join(rng.choice(list(letters), 12)), "label": ["low", "high"][label]})
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    work = tmp_path / "run"
    train(load_config(None, [f"model={preset}", "model.vocab_size=259", "model.d_model=32", "model.n_layers=2",
                             "model.n_heads=4", "model.max_len=16", "model.dropout=0", "model.attention_dropout=0",
                             "data.seq_len=16", "data.batch_size=16", f"data.path={task}", "train.objective=classify",
                             "train.steps=40", "train.eval_every=40", "optim.lr=3e-3", "optim.warmup_steps=5",
                             f"train.workdir={work}"]), log=lambda m: None)
    ev = evaluate_model(work)
    assert ev["objective"] == "classify" and ev["examples"] == 32 and ev["majority_baseline"] == 0.5
    assert ev["accuracy"] >= 0.9 and ev["macro_f1"] >= 0.9, ev
    lm = jaxlm.load(work)
    assert lm.config.label_names == ("high", "low")
    assert lm.classify(["abcabcabc", "xyzxyzxyz"]) == ["low", "high"]


def test_pretrained_minilm_fine_tuned_and_exported_runs_in_transformers(tmp_path):
    """Real weights end to end: the pretrained MiniLM (a BertModel) gets a classification head
    from `jaxlm train train.objective=classify`, and its Hugging Face export, read by
    AutoModelForSequenceClassification, gives jaxlm's logits and label names."""
    import torch
    import transformers

    from jaxlm.io import export
    from jaxlm.testing import minilm_dir
    from jaxlm.train import train

    package_task(tmp_path / "task", packages=("asyncio", "email", "tkinter"), chunks_per_file=2)
    train(load_config(None, [f"adapt.init={minilm_dir()}", "train.objective=classify", f"data.path={tmp_path / 'task'}",
                             "data.seq_len=16", "data.batch_size=4", "train.steps=2", "train.eval_every=0", "mesh.data=1",
                             f"train.workdir={tmp_path / 'run'}", "optim.lr=5e-5", "optim.warmup_steps=1"]),
          log=lambda m: None)
    export(tmp_path / "run", tmp_path / "hf")
    lm = jaxlm.load(tmp_path / "run")
    assert lm.config.head == "classify" and lm.config.pooler and lm.config.n_layers == 6 and lm.config.d_model == 384
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == {0: "asyncio", 1: "email", 2: "tkinter"}
    texts = ["import asyncio\nasync def main():\n    await asyncio.sleep(1)", "from email.message import Message"]
    rows = [lm.tokenizer.encode(t) for t in texts]
    ids, mask = np.zeros((2, max(map(len, rows))), np.int64), np.zeros((2, max(map(len, rows))), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    with torch.no_grad():
        theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(lm.logits(ids, mask)), theirs, atol=1e-4)
    assert lm.classify(texts) == [hf.config.id2label[int(i)] for i in theirs.argmax(-1)]
