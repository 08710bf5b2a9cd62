"""Thin entry script: `python training/train.py --data DIR --out RUN [--config FILE] [key=value ...]`.

Same as `lumbar-tf train`; kept for teams that launch training from a script path.
"""

import sys

from lumbar_tf.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
