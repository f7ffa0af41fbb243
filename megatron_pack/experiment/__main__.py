"""``python -m megatron_pack.experiment``: the paper's study on your model (:mod:`.study_cli`).
The plain comparison on your data is ``tools/compare_modes.py``."""
import sys

from megatron_pack.experiment.study_cli import main

if __name__ == "__main__":  # not in a process that multiprocessing spawns (checkpoint writers)
    sys.exit(main())
