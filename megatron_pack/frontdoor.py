"""The argument parser every command line uses: one-line errors, typos answered with the flag meant.

argparse prints the whole usage block (48 lines for training) before a one-line error, takes
``--seq`` as an abbreviation of ``--seq-length`` and, where a tool uses ``parse_known_args``,
silently drops a misspelt flag. :class:`FrontDoorParser` instead

- prints ``PROG: error: MESSAGE`` and where to find the usage, on one line, exit status 2;
- rejects unknown flags, naming the nearest valid one (``difflib``): ``--seq-lenght`` ->
  ``did you mean --seq-length?``;
- takes flags only by their full name (Megatron-LM's ``allow_abbrev=False``);
- shows ``(default: X)`` only where the help text does not already speak of the default, and
  marks required flags ``(required)``;
- under torchrun (or srun) prints a refusal once, from rank 0 (:func:`refusal`): every rank
  checks the same command line and files, and eight copies of one line bury it.

Imports only the standard library: the front doors build and run it before any heavy import,
so a wrong invocation answers in well under a second.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
from typing import NoReturn


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Defaults shown once, required flags marked, descriptions kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required and action.option_strings:
            text += " (required)"
        default = action.default
        shown = default not in (None, False, argparse.SUPPRESS) and action.nargs != 0 and "default" not in text.lower()
        if shown and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class FrontDoorParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line errors and suggestions for unknown flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def known_flags(self) -> list[str]:
        """Every option string of this parser and its sub-commands."""
        flags = []
        for action in self._actions:
            flags += [s for s in action.option_strings if s.startswith("--")]
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags += sub.known_flags() if isinstance(sub, FrontDoorParser) else []
        return sorted(set(flags))

    def parse_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        known = self.known_flags()
        words = argv[:argv.index("--")] if "--" in argv else argv
        typos = [w for w in words if w.startswith("--") and w.split("=", 1)[0] not in known]
        if typos and "-h" not in words and "--help" not in words:  # before "required" complaints
            self.error(unknown_message(typos, known))
        ns, extras = self.parse_known_args(argv, namespace)
        if extras:
            self.error(unknown_message(extras, self.known_flags()))
        return ns

    def error(self, message):
        fail(self.prog, f"{message} (--help lists the flags)")


def unknown_message(extras: list[str], known: list[str]) -> str:
    """``unrecognized argument --seq-lenght (did you mean --seq-length?)`` for each extra flag."""
    parts = []
    for word in extras:
        if not word.startswith("-"):
            continue  # the value of an unknown flag: reported with the flag
        flag = word.split("=", 1)[0]
        if flag in known:  # a flag of another sub-command
            parts.append(f"{flag} (not a flag of this command)")
            continue
        near = [k for k in known if k.startswith(flag)][:3] or difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        parts.append(f"{flag}" + (f" (did you mean {' or '.join(near)}?)" if near else ""))
    if not parts:
        return "unexpected argument(s): " + " ".join(extras)
    return "unrecognized argument" + ("s " if len(parts) > 1 else " ") + ", ".join(parts)


#: How long a quiet rank waits before exiting with the refusal's status: under torchrun the first
#: rank to exit makes the agent stop the others, which could cut rank 0 off before its line is out.
QUIET_RANK_WAIT_S = 2.0


def speaks_for_the_job() -> bool:
    """Whether this process prints a refusal: ``RANK`` 0, else ``LOCAL_RANK`` 0 (torchrun sets
    both; read from the environment, so it holds before the process group exists), else a lone
    process."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value:
            return value == "0" or not value.isdigit()
    return True


def refusal(prog: str, message: str, status: int = 2, prefix: str = "error: ") -> int:
    """Write ``PROG: error: MESSAGE`` on one line from the rank that speaks for the job; the
    others stay quiet, wait :data:`QUIET_RANK_WAIT_S`, and the caller exits with ``status`` on
    every rank alike. Returns ``status``."""
    if speaks_for_the_job():
        sys.stderr.write(f"{prog + ': ' if prog else ''}{prefix}{message}\n")
        sys.stderr.flush()
    else:
        time.sleep(QUIET_RANK_WAIT_S)
    return status


def fail(prog: str, message: str, status: int = 2) -> NoReturn:
    """One-line error for a check made after parsing (a missing file), argparse's format; once
    per job under torchrun (:func:`refusal`)."""
    sys.exit(refusal(prog, message, status))
