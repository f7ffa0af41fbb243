#!/usr/bin/env python
"""Train the same model under several packing settings and write the paper's tables.

    python tools/compare_modes.py --modes padding padding:pad_to=longest greedy:chunk=1000 random:chunk=1000 bfd \
        --masks on off [--synthetic 4000] [-- TRAINING FLAGS]

``--help`` lists the flags (``megatron_pack/experiment/compare_cli.py``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package

from megatron_pack.experiment.compare_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
