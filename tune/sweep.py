"""`python tune/sweep.py`: the main job. Ray Tune sweep of LaRP-CLIP with MLflow tracking.

Thin on purpose: the sweep lives in `larp.sweep`; `--help` lists the flags.
"""

import sys

from larp.sweep import main

if __name__ == "__main__":
    sys.exit(main())
