"""``python -m megatron_pack.train``: SFT with sequence packing on Megatron-Core.

Launch with torchrun (one process per GPU; on CPU, gloo)::

    torchrun --nproc-per-node 8 -m megatron_pack.train --data-path data/sft --model llama3-8b \\
        --pack-mode bfd --seq-length 4096 --micro-batch-size 1 --global-batch-size 64 \\
        --train-epochs 3 --lr 1e-5 --lr-warmup-fraction 0.2 --tensor-model-parallel-size 8 \\
        --save ckpt --load ckpt

``--help`` lists every flag (generated from :mod:`megatron_pack.config.spec`).
Exit status: 0 when done or stopped by SIGTERM after saving, 1 on a non-finite loss or a leak
found by ``--check-isolation error|only``,
2 on a bad command line, missing input or a refused input (dataset, checkpoint, --save in use). The
command line, the batch arithmetic and the dataset's files are checked before Megatron-Core (or
torch) is imported: a wrong invocation answers in well under a second, on one line.
"""

from __future__ import annotations

import os
import sys

PROG = "python -m megatron_pack.train"


def main(argv=None) -> int:
    from megatron_pack.config.cli import parse_args
    from megatron_pack.config.spec import ConfigError
    from megatron_pack.files.indexed import check_dataset
    from megatron_pack.files.indexed_check import DatasetError
    from megatron_pack.frontdoor import refusal
    from megatron_pack.quiet import quiet_library_noise

    quiet_library_noise()
    config = parse_args(argv)
    try:
        # Layout and batch arithmetic against torchrun's WORLD_SIZE (and --model's heads and
        # layers) and the dataset's files before paying for Megatron's import; train() checks
        # again against the real process group and the architecture --load records.
        config.resolve(int(os.environ.get("WORLD_SIZE", "1")), architecture=_flag_architecture(config))
        for prefix in config.data.prefixes:  # every source of a blend, and --valid-data-path's
            check_dataset(prefix)  # missing parts, or an empty dataset
        if config.logging.wandb_project:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("--wandb-project: the wandb package is not installed (pip install wandb, "
                                  "or the project's wandb extra)")
    except (ConfigError, FileNotFoundError, DatasetError) as e:
        return refusal(PROG, str(e))  # once per job under torchrun

    from megatron_pack.checkpoint.dist import CheckpointSaveError
    from megatron_pack.checkpoint.iterations import CheckpointError
    from megatron_pack.convert.hf_config import ConversionError
    from megatron_pack.training.isolation import IsolationLeakError
    from megatron_pack.training.loop import NonFiniteLossError, train

    try:
        train(config)
    except (
        ConfigError,
        ConversionError,
        DatasetError,
        CheckpointError,
        FileNotFoundError,
    ) as e:  # bad settings or files
        return refusal(PROG, str(e))
    except (NonFiniteLossError, CheckpointSaveError, IsolationLeakError) as e:  # it ran and failed (README: exit 1)
        return refusal("", str(e), status=1)
    return 0


def _flag_architecture(config):
    """The architecture --model names (a preset or a HF config.json), or None when the run takes
    the one --load / --pretrained-checkpoint records (checked in train(), once it is read)."""
    if not config.model.model:
        return None
    from megatron_pack.config.spec import ConfigError
    from megatron_pack.model.presets import get_preset

    try:
        return get_preset(config.model.model)
    except ValueError as e:  # an unreadable or refused config.json (ArchitectureError)
        raise ConfigError(f"--model: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
