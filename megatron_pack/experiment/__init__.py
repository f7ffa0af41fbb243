"""The paper's experiment on your data: compare packing settings fairly (:mod:`.compare`) and
measure what a no-mask run leaks between packed samples (:mod:`.leakage`)."""
