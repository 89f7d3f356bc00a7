"""`jaxlm train` for pods and clusters: python scripts/train.py [--config FILE] [key=value ...]."""

import sys

from jaxlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
