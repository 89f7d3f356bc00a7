"""Convert a Hugging Face checkpoint to a jaxlm model dir: python scripts/convert_hf.py SRC DST [--overwrite]."""

import sys

from jaxlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
