"""Thin entry script: `python export/export.py --model RUN --out EXPORT [--tflite ...] [--data HELDOUT]`.

Same as `lumbar-tf export` (SavedModel for TF Serving + TFLite variants for tablets, see
lumbar_tf/export/job.py); kept for teams that launch the export from a script path.
"""

import sys

from lumbar_tf.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
