"""LoRA adapters in the PEFT format: a LoRA trained by jaxlm runs in peft on the exported base with
jaxlm's logits, and an adapter made by peft runs in jaxlm (and trains further) with peft's."""

import json

import numpy as np
import peft
import pytest
import torch
import transformers

import jaxlm
from jaxlm.config import load_config
from jaxlm.io import export
from jaxlm.train import train

from conftest import stdlib_slice

TOL = 1e-4
IDS = np.random.RandomState(0).randint(0, 512, (2, 11))
RUN = ["model.max_len=64", "data.seq_len=32", "data.batch_size=8", "train.eval_every=0", "optim.lr=1e-2", "mesh.data=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = stdlib_slice(tmp_path_factory.mktemp("peft"))
    return [f"data.path={root / 'text'}", f"data.data_dir={root / 'cache'}"]


def peft_logits(base_dir, adapter_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def test_jaxlm_lora_exported_with_peft_runs_in_peft(hf_dir, corpus, tmp_path):
    base = hf_dir("LlamaForCausalLM")
    work = tmp_path / "lora"
    train(load_config(None, [*RUN, *corpus, "train.steps=3", f"train.workdir={work}", f"adapt.init={base}",
                             "adapt.method=lora", "adapt.lora_rank=4", "adapt.lora_targets=q,v,gate,down"]),
          log=lambda m: None)
    export(work, tmp_path / "hf", peft=True)
    conf = json.loads((tmp_path / "hf" / "adapter" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["base_model_name_or_path"] == str(tmp_path / "hf")
    lm = jaxlm.load(work)
    ours = np.asarray(lm.logits(IDS))
    err = np.abs(peft_logits(tmp_path / "hf", tmp_path / "hf" / "adapter") - ours).max()
    print(f"peft on the exported base vs jaxlm: {err:.2e}")
    assert err <= TOL
    assert np.abs(ours - np.asarray(jaxlm.load(base).logits(IDS))).max() > 1e-3  # the adapters matter


def test_peft_adapter_runs_in_jaxlm_and_trains_further(hf_dir, corpus, tmp_path):
    base = hf_dir("LlamaForCausalLM")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                                                       init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    lm = jaxlm.load(tmp_path / "adapter")
    assert (lm.config.lora_rank, lm.config.lora_alpha, lm.config.lora_targets) == (4, 8.0, ("q", "o", "up"))
    err = np.abs(np.asarray(lm.logits(IDS)) - peft_logits(base, tmp_path / "adapter")).max()
    print(f"jaxlm on the peft adapter vs peft: {err:.2e}")
    assert err <= TOL
    # adapt.init takes it: the run trains those adapters further (their settings must match).
    args = [*RUN, *corpus, "train.steps=2", f"train.workdir={tmp_path / 'more'}", f"adapt.init={tmp_path / 'adapter'}",
            "adapt.method=lora", "adapt.lora_rank=4", "adapt.lora_alpha=8", "adapt.lora_targets=q,o,up"]
    train(load_config(None, args), log=lambda m: None)
    more = jaxlm.load(tmp_path / "more")
    assert more.config.lora_rank == 4 and np.abs(np.asarray(more.logits(IDS)) - np.asarray(lm.logits(IDS))).max() > 0
    with pytest.raises(ValueError, match=r"has LoRA adapters already \(rank 4, alpha 8 on q,o,up\)"):
        train(load_config(None, [*args[:-3], f"train.workdir={tmp_path / 'x'}"]), log=lambda m: None)
