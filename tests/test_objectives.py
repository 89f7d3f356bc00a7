"""The objective registry (``jaxlm.objectives``): an objective is one module; training, its steps,
its evaluation and ``jaxlm eval`` ask it what to do and never compare names."""

import ast
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

from jaxlm import objectives
from jaxlm.config import load_config
from jaxlm.data import stdlib_dir
from jaxlm.objectives.clm import CLM
from jaxlm.train import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=gpt2-tiny", "model.vocab_size=259", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.max_len=32", "data.seq_len=32", "data.batch_size=8", "train.eval_batches=2", "train.steps=1",
        "train.eval_every=1", "train.save_every=0"]


@pytest.fixture
def toy():
    """A toy objective, registered the way every objective is (``@register``) from this file
    only: the causal LM loss doubled, and an eval metric of its own."""
    @objectives.register
    @dataclasses.dataclass(frozen=True)
    class Doubled(CLM):
        name = "toy_doubled"

        def loss_sums(self, model, rows, *, key=None, mask_key=None, second=None):
            total, count, stats = super().loss_sums(model, rows, key=key, mask_key=mask_key)
            return 2 * total, count, stats

        def eval_metrics(self, totals):
            return {"half_loss": totals.loss / 2}

    yield Doubled
    del objectives.REGISTRY["toy_doubled"]


def evals(workdir):
    return [json.loads(line) for line in open(Path(workdir, "metrics.jsonl")) if "val_loss" in line]


def test_a_toy_objective_needs_no_edit_outside_its_file(toy, tmp_path):
    """Registered in this test, the toy objective trains through jaxlm's own train(), its loss and
    metric reach metrics.jsonl, and it is listed among the objectives a bad name is told about. At
    step 0 a fresh byte-level model's mean NLL is about ln 259 (test_train checks clm's to 0.3):
    the toy's val_loss is twice that."""
    corpus = tmp_path / "text"
    corpus.mkdir()
    for f in sorted(stdlib_dir().glob("*.py"))[:20]:
        shutil.copy(f, corpus / f.name)
    common = [*TINY, f"data.path={corpus}", f"data.data_dir={tmp_path / 'cache'}"]
    train(load_config(None, [*common, "train.objective=toy_doubled", f"train.workdir={tmp_path / 'toy'}"]),
          log=lambda msg: None)
    first, last = evals(tmp_path / "toy")
    assert (first["step"], last["step"]) == (0, 1)
    assert abs(first["val_loss"] - 2 * math.log(259)) < 0.6
    assert first["val_half_loss"] == pytest.approx(first["val_loss"] / 2, rel=1e-6)
    with pytest.raises(ValueError, match=r"train.objective='toy_doubld' is not one of clm, .*toy_doubled"
                                         r" \(did you mean 'toy_doubled'\?\)"):
        train(load_config(None, [*common, "train.objective=toy_doubld", f"train.workdir={tmp_path / 'x'}"]))
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_no_module_outside_the_registry_compares_objective_names():
    """The names of the objectives appear in their own modules only (and as the default of
    train.objective): a comparison with one anywhere else is a branch the registry should own."""
    names = set(objectives.REGISTRY)
    found = []
    for path in sorted((ROOT / "jaxlm").rglob("*.py")):
        if "objectives" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in names]
                subjects = [a for a in ast.walk(node) if "objective" in getattr(a, "attr", getattr(a, "id", ""))]
                if consts and subjects:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"objective names compared outside jaxlm/objectives: {', '.join(found)}"
