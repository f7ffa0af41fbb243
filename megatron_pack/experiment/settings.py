"""Settings of a mode comparison: packing mode x document mask, each trained the same way.

``expand_settings(["padding", "greedy", "bfd"], [True, False])`` gives padding once (one
conversation per sequence: the mask changes nothing) and greedy and bfd with and without the
mask. A setting's name is its mode, with ``/nomask`` when the mask is off::

    padding   greedy   greedy/nomask   bfd   bfd/nomask

Two more knobs ride in the name: ``@step`` packs per step (``--pack-scope step``: the padded
run's steps, each packed with bfd) and ``+sample`` weights each conversation's mean loss
(``--loss-weighting sample``)::

    bfd@step   bfd@step+sample   padding+sample   bfd/nomask+sample
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_pack.packing.modes import PAPER_MODES, get_mode


@dataclass(frozen=True)
class Setting:
    mode: str
    document_mask: bool = True
    pack_scope: str = "epoch"  # --pack-scope
    loss_weighting: str = "token"  # --loss-weighting

    @property
    def name(self) -> str:
        return (self.mode + ("@step" if self.pack_scope == "step" else "") + ("" if self.document_mask else "/nomask")
                + ("+sample" if self.loss_weighting == "sample" else ""))

    @classmethod
    def parse(cls, spec: str) -> "Setting":
        """``bfd``, ``greedy:chunk=1000/nomask``, ``bfd@step+sample``; raises ValueError naming the bad part."""
        body, plus, weighting = spec.partition("+")
        if plus and weighting not in ("sample", "token"):
            raise ValueError(f"setting {spec!r}: suffix must be +sample or +token, got +{weighting}")
        body, slash, flag = body.partition("/")
        if slash and flag not in ("nomask", "mask"):
            raise ValueError(f"setting {spec!r}: suffix must be /mask or /nomask, got /{flag}")
        mode, at, scope = body.partition("@")
        if at and scope not in ("step", "epoch"):
            raise ValueError(f"setting {spec!r}: scope must be @step or @epoch, got @{scope}")
        if scope == "step" and get_mode(mode).name != "bfd":
            raise ValueError(f"setting {spec!r}: @step packs each step with bfd")
        return cls(str(get_mode(mode)), flag != "nomask", scope or "epoch", weighting or "token")


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
                s = Setting(s.mode, bool(mask), s.pack_scope, s.loss_weighting)
            if _one_per_sequence(s.mode):
                s = Setting(s.mode, True, s.pack_scope, s.loss_weighting)
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


# PAPER_MODES (packing.modes: the paper's modes in its tables' order) is the default of every
# comparison (the demo, tools/compare_modes.py and the study), each under the mask choices given.
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


def baseline_name(names: list[str]) -> str | None:
    """The name speedups and quality comparisons are over (:func:`baseline`); None without names."""
    return baseline([Setting.parse(n) for n in names]).name if names else None


def quality_pairs(names: list[str], base: str | None = "padding") -> list[tuple[str, str]]:
    """``(a, b)`` pairs the study compares on quality: every setting against ``base``, each
    no-mask setting against its masked twin, and each ``+sample`` setting against its
    token-weighted twin."""
    pairs = [(n, base) for n in names if n != base] if base in names else []
    twins = [(n, n.replace("/nomask", "")) for n in names if "/nomask" in n]
    twins += [(n, n.removesuffix("+sample")) for n in names if n.endswith("+sample")]
    return pairs + [(a, b) for a, b in twins if b in names and (a, b) not in pairs]
