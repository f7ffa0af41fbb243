"""megatron_pack.packing: lengths -> plans. Which token slices of which conversations fill
each training sequence.

    modes      the packing-mode registry (padding, greedy, random, bfd, windowed_bfd)
    plan       PackingPlan, the over-long policy at packing time, build_plan
    reference  numpy/Python twins of the C++ engine (csrc/packing.cpp)
    cache      plans cached on disk by config hash (rank 0 builds, others mmap)
    report     pack_report: one row per mode, JSON and PNG
"""
