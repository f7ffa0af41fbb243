"""megatron_pack.config: the run spec, one definition read by training, the planner and the experiment.

    spec    model / parallel / data (packing) / optim / train / checkpoint / logging sections as
            documented dataclasses holding parsed values (PackingMode, Blend), each checked once
    cli     the training command line generated from the spec, and the planner's modelled subset

Light on import (no torch): the front doors parse and check before any heavy import.
"""
