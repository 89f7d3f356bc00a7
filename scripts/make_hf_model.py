"""Write a Hugging Face model with random weights and real tokenizer files, for offline demos.

    python scripts/make_hf_model.py GPT2LMHeadModel /tmp/hf-gpt2 [--size tiny|base] [--init-range 0.2]
"""

import argparse

from jaxlm.testing import ARCHITECTURES, save_random_hf

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("architecture", choices=ARCHITECTURES)
    p.add_argument("dst")
    p.add_argument("--size", choices=["tiny", "base"], default="tiny")
    p.add_argument("--init-range", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(save_random_hf(a.architecture, a.dst, size=a.size, init_range=a.init_range, seed=a.seed))
