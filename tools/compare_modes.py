#!/usr/bin/env python
"""Train the same model under several packing settings and write the paper's tables.

    python tools/compare_modes.py --modes padding padding:pad_to=longest greedy:chunk=1000 random:chunk=1000 bfd \
        --masks on off [--synthetic 4000] [-- TRAINING FLAGS]

``--help`` lists the flags (``megatron_pack/experiment/compare_cli.py``).
"""

import sys

from megatron_pack.experiment.compare_cli import main

if __name__ == "__main__":
    sys.exit(main())
