"""`jaxlm generate`: python scripts/generate.py MODEL --prompt TEXT [...]."""

import sys

from jaxlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
