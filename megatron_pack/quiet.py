"""Library noise that says nothing a user can act on, filtered at the front doors only.

Megatron-Core 0.16 and torch print, on every CPU run: four "Transformer Engine and Apex are
not installed" warnings at import, two "Apex is not installed. Falling back to Torch Norm",
"full scope is deprecated" for its own default ``cuda_graph_scope``, and on resume torch's
``load_state_dict`` / ``ShardedTensor`` FutureWarnings raised from inside Megatron-Core's
checkpoint loader; the exporter reads a checkpoint in one process and torch says it assumes
that. None of them concerns a flag of ours; what *is* in use is stated once by
the run header instead (:func:`megatron_pack.model.spec.describe`).

Each filter matches one exact message start (with its category), never a whole category
or module, so any other warning, including ours, still shows. Library code never calls
:func:`quiet_library_noise`; ``tools/*.py``, ``python -m megatron_pack.train`` and the demo do,
first thing in ``main``. ``MEGATRON_PACK_SHOW_LIBRARY_WARNINGS=1`` turns it off.
"""

from __future__ import annotations

import os
import re
import warnings

#: (category, start of the message) of each filtered warning, and why it is not actionable.
NOISE = (
    (UserWarning, "Transformer Engine and Apex are not installed"),  # the run header says which backends
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),  # ditto; our spec picks the norm
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope"),  # Megatron-Core's own default
    (FutureWarning, "`load_state_dict` is deprecated and will be removed"),  # torch, inside Megatron's loader
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor"),  # ditto
    # torch's checkpoint reader when the exporter reads a dist checkpoint in one process, as intended
    (UserWarning, "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load"),
)


def quiet_library_noise() -> None:
    """Install the filters above (idempotent); call it at the top of a front door's ``main``."""
    if os.environ.get("MEGATRON_PACK_SHOW_LIBRARY_WARNINGS", "0") == "1":
        return
    for category, start in NOISE:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
