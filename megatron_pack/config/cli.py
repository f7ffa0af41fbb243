"""The training and the planner command lines, generated from the run spec's dataclasses.

Each leaf field becomes one flag (``tensor_model_parallel_size`` ->
``--tensor-model-parallel-size``, Megatron-LM's names); a bool field becomes the pair
``--flag/--no-flag``; nested dataclasses become argument groups; a field whose metadata says
``required`` is a required flag. Parsing builds the dataclasses, so their ``__post_init__``
checks run on the command line too. The parser is :class:`megatron_pack.frontdoor.FrontDoorParser`
(one-line errors, unknown flags answered with the nearest valid one), so new fields need
nothing here. The planner (``tools/plan_parallel.py``) takes the subset of fields it models
through :func:`add_spec_flags`: the same field objects, so the same flag, help, type and choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Optional, Union

from megatron_pack.config.spec import ConfigError, RunSpec, TrainConfig, flag_name
from megatron_pack.frontdoor import FrontDoorParser

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
    _add_flags(parser, config_cls, _leaves(config_cls))
    return parser


def spec_fields(config_cls=RunSpec) -> dict:
    """``{field name: (attribute path, field, type)}`` of every leaf of the spec (names are unique)."""
    return {path[-1]: (path, f, tp) for path, f, tp in _leaves(config_cls)}


def add_spec_flags(parser: argparse.ArgumentParser, names, defaults: dict | None = None,
                   config_cls=RunSpec, aliases: dict | None = None) -> None:
    """Add the flags of the spec fields ``names`` (the planner's modelled subset), each generated
    from the spec's field as the training CLI's is; ``defaults`` overrides a default by field
    name, ``aliases`` adds option strings (the planner's ``--data-prefix``)."""
    fields = spec_fields(config_cls)
    _add_flags(parser, config_cls, [fields[n] for n in names], defaults or {}, aliases or {})


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str, aliases: dict | None = None) -> None:
    """One group of flags from a flat dataclass of :func:`~megatron_pack.config.spec.arg` fields
    (the planner's cluster section)."""
    group = parser.add_argument_group(title, plain(cls.__doc__ or ""))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        group.add_argument(*_option_strings(f, aliases or {}), **_kwargs((f.name,), f, hints[f.name]))


def _option_strings(f: dataclasses.Field, aliases: dict) -> list:
    return [flag_name(f), *aliases.get(f.name, ())]


def _kwargs(path, f: dataclasses.Field, tp, default=dataclasses.MISSING) -> dict:
    """argparse keywords of one leaf field."""
    base, _ = _base_type(tp)
    if default is dataclasses.MISSING:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kw = dict(dest=_dest(path), default=default, help=plain(f.metadata.get("help", "")))
    if f.metadata.get("required"):
        kw["required"] = True
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction
        return kw
    if base not in (int, float, str):
        raise TypeError(f"field {'.'.join(path)}: unsupported type {tp}")
    kw["type"] = base
    if "choices" in f.metadata:
        kw["choices"] = f.metadata["choices"]
    if "nargs" in f.metadata:
        kw["nargs"] = f.metadata["nargs"]
    if "choices" not in f.metadata:  # not argparse's DEST-style "MODEL__VOCAB_SIZE"
        kw["metavar"] = f.metadata.get("metavar") or f.name.upper()
    return kw


def _add_flags(parser, config_cls, leaves, defaults: dict | None = None, aliases: dict | None = None) -> None:
    groups: dict = {}
    seen: dict = {}
    hints = typing.get_type_hints(config_cls)
    for path, f, tp in leaves:
        owner = hints[path[0]] if len(path) > 1 else config_cls
        title = path[0] if len(path) > 1 else "general"
        if title not in groups:
            groups[title] = parser.add_argument_group(title, plain(owner.__doc__ or ""))
        flag = flag_name(f)
        if flag in seen:
            raise TypeError(f"flag {flag} generated twice: {seen[flag]} and {'.'.join(path)}")
        seen[flag] = ".".join(path)
        kw = _kwargs(path, f, tp, (defaults or {}).get(f.name, dataclasses.MISSING))
        groups[title].add_argument(*_option_strings(f, aliases or {}), **kw)


def _build(cls, values: dict, path=()):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values, path + (f.name,))
        elif _dest(path + (f.name,)) in values:  # a field the command line did not model keeps its default
            kwargs[f.name] = values[_dest(path + (f.name,))]
    return cls(**kwargs)


def build_spec(values: dict, config_cls=RunSpec):
    """The spec from parsed values (``vars(namespace)``; missing fields keep their defaults);
    the sections' checks run here and raise :class:`ConfigError`."""
    return _build(config_cls, values)


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
