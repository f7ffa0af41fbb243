"""megatron_pack.checkpoint: everything on disk that a run saves or starts from.

    layout         iter_NNNNNNN directories, the marker file, CheckpointError
    dist           dist_checkpointing save/load of model, optimizer, scheduler, data position
    rng            per-rank RNG state (tensors only)
    signals        SIGTERM -> save at the step boundary
    safe_metadata  the restricted unpickler every dist checkpoint is read through first
    integrity      checksum manifest, one run per --save (flock), forked writers die with the run
    mcore_shim     Megatron-Core private names, version-checked: the writer's results queue in-process
    dist_reader    one tensor / one layer at a time from a dist checkpoint (no process group)
    imported       the hf-to-megatron import format and loading it into a model

Used by training/ and convert/; imports neither.
"""
