"""The training command line, generated from the config dataclasses.

Each leaf field becomes one flag (``tensor_model_parallel_size`` ->
``--tensor-model-parallel-size``, Megatron-LM's names); a bool field becomes the pair
``--flag/--no-flag``; nested dataclasses become argument groups; a field whose metadata says
``required`` is a required flag. Parsing builds the dataclasses, so their ``__post_init__``
checks run on the command line too. The parser is :class:`megatron_pack.frontdoor.FrontDoorParser`
(one-line errors, unknown flags answered with the nearest valid one), so new fields need
nothing here.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Optional, Union

from megatron_pack.frontdoor import FrontDoorParser
from megatron_pack.training.config import ConfigError, TrainConfig, flag_name

DESCRIPTION = ("Supervised fine-tuning with sequence packing on Megatron-Core. Flag names follow "
               "Megatron-LM; one group per concern.")


def _base_type(tp):
    """(scalar type, optional?) of a field annotation such as ``Optional[int]``."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported field type {tp}")
        return args[0], True
    return tp, False


def _leaves(cls, path=()):
    """(attribute path, field, resolved type) for every scalar field under ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, path + (f.name,))
        else:
            yield path + (f.name,), f, tp


def _dest(path) -> str:
    return "__".join(path)


def plain(text: str) -> str:
    """Docstring text for a terminal: RST roles and literals (``x``, :class:`y`) as plain words."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def build_parser(config_cls=TrainConfig, prog: str = "python -m megatron_pack.train",
                 description: str = DESCRIPTION) -> argparse.ArgumentParser:
    parser = FrontDoorParser(prog=prog, description=description)
    groups: dict = {}
    seen: dict = {}
    hints = typing.get_type_hints(config_cls)
    for path, f, tp in _leaves(config_cls):
        owner = hints[path[0]] if len(path) > 1 else config_cls
        title = path[0] if len(path) > 1 else "general"
        if title not in groups:
            groups[title] = parser.add_argument_group(title, plain(owner.__doc__ or ""))
        flag = flag_name(f)
        if flag in seen:
            raise TypeError(f"flag {flag} generated twice: {seen[flag]} and {'.'.join(path)}")
        seen[flag] = ".".join(path)
        base, _ = _base_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(dest=_dest(path), default=default, help=plain(f.metadata.get("help", "")))
        if f.metadata.get("required"):
            kw["required"] = True
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if base not in (int, float, str):
                raise TypeError(f"field {'.'.join(path)}: unsupported type {tp}")
            kw["type"] = base
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            if "nargs" in f.metadata:
                kw["nargs"] = f.metadata["nargs"]
            if "choices" not in f.metadata:  # not argparse's DEST-style "MODEL__VOCAB_SIZE"
                kw["metavar"] = f.metadata.get("metavar") or f.name.upper()
        groups[title].add_argument(flag, **kw)
    return parser


def _build(cls, values: dict, path=()):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values, path + (f.name,))
        else:
            kwargs[f.name] = values[_dest(path + (f.name,))]
    return cls(**kwargs)


def parse_args(argv: Optional[list] = None, config_cls=TrainConfig) -> TrainConfig:
    """argv -> config; a :class:`ConfigError` becomes argparse's usage error (exit 2)."""
    parser = build_parser(config_cls)
    ns = parser.parse_args(argv)
    try:
        return _build(config_cls, vars(ns))
    except ConfigError as e:
        parser.error(str(e))


def to_argv(config) -> list:
    """The flags that reproduce ``config`` (for logs and for launching subprocesses)."""
    argv = []
    for path, f, tp in _leaves(type(config)):
        value = config
        for p in path:
            value = getattr(value, p)
        flag = flag_name(f)
        if _base_type(tp)[0] is bool and value is not None:
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None and not isinstance(value, bool):
            argv += [flag, str(value)]
    return argv


def config_dict(config) -> dict:
    return dataclasses.asdict(config)
