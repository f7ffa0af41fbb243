"""Settings of a mode comparison: packing mode x document mask, each trained the same way.

``expand_settings(["padding", "greedy", "bfd"], [True, False])`` gives padding once (one
conversation per sequence: the mask changes nothing) and greedy and bfd with and without the
mask. A setting's name is its mode, with ``/nomask`` when the mask is off::

    padding   greedy   greedy/nomask   bfd   bfd/nomask
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_pack.packing.modes import get_mode


@dataclass(frozen=True)
class Setting:
    mode: str
    document_mask: bool = True

    @property
    def name(self) -> str:
        return self.mode + ("" if self.document_mask else "/nomask")

    @classmethod
    def parse(cls, spec: str) -> "Setting":
        """``bfd``, ``greedy:chunk=1000/nomask``; raises ValueError naming the bad part."""
        mode, slash, flag = spec.partition("/")
        if slash and flag not in ("nomask", "mask"):
            raise ValueError(f"setting {spec!r}: suffix must be /mask or /nomask, got /{flag}")
        return cls(str(get_mode(mode)), flag != "nomask")


def _one_per_sequence(mode: str) -> bool:
    return get_mode(mode).name == "padding"


def expand_settings(modes, masks=(True,)) -> list[Setting]:
    """Every mode under every mask choice, padding modes once (with the mask: identical);
    a spec with its own ``/mask`` or ``/nomask`` is taken as written."""
    out = []
    for spec in modes:
        for mask in masks:
            s = Setting.parse(spec)
            if "/" not in spec:
                s = Setting(s.mode, bool(mask))
            if _one_per_sequence(s.mode):
                s = Setting(s.mode, True)
            if s not in out:
                out.append(s)
    return out


def baseline(settings: list[Setting]) -> Setting:
    """What speedups are over: ``padding``, else the paper code's padding, else the first."""
    for want in ("padding", "padding:pad_to=longest"):
        for s in settings:
            if s.mode == want:
                return s
    return settings[0]


#: The paper's packing modes in the order its tables list them: the default of every comparison
#: (the demo, tools/compare_modes.py and the study), each under the mask choices it is given.
PAPER_MODES = ("padding", "greedy", "random", "bfd")
#: The study scores leakage on this pair (without and with the mask) and trains it first, so a
#: run cut short by its time budget still has the most informative rows.
LEAKAGE_PAIR = ("greedy/nomask", "greedy")


def setting_names(modes=PAPER_MODES, masks=(True, False)) -> list[str]:
    """The settings' names in table order (padding, then each mode with and without the mask)."""
    return [s.name for s in expand_settings(modes, masks)]


def run_order(names: list[str]) -> list[str]:
    """The study's training order: the leakage pair first ("greedy" before "greedy/nomask"), then
    the others as listed."""
    first = [n for n in reversed(LEAKAGE_PAIR) if n in names]
    return first + [n for n in names if n not in first]


def quality_pairs(names: list[str], base: str = "padding") -> list[tuple[str, str]]:
    """``(a, b)`` pairs the study compares on quality: every setting against ``base``, then each
    no-mask setting against its masked twin."""
    pairs = [(n, base) for n in names if n != base] if base in names else []
    return pairs + [(n, n.removesuffix("/nomask")) for n in names
                    if n.endswith("/nomask") and n.removesuffix("/nomask") in names]
