"""How a config field becomes a command-line flag: :func:`flag` declares it (default, help sentence,
range, Megatron's spelling), :func:`check_fields` checks a config against its declarations, and
``megalite/training/arguments.py`` reads the same declarations to build the parser."""
from __future__ import annotations

import argparse
import math
from dataclasses import field, fields
from typing import Any, Callable, Literal, Optional, get_args, get_origin, get_type_hints

__all__ = ["flag", "flag_name", "choices", "check_fields", "FieldParser"]


def flag(default: Any, help: str, *, at_least: Optional[float] = None, above: Optional[float] = None,
         at_most: Optional[float] = None, below: Optional[float] = None, name: Optional[str] = None,
         cli: bool = True, parse: Optional[Callable[[Any], Any]] = None) -> Any:
    """A config field that is also a command-line flag.

    ``help``: the sentence ``--help`` shows.  ``at_least`` / ``above`` / ``at_most`` / ``below``: the
    allowed range (checked in ``__post_init__``; None values are not checked).  ``name``: the flag
    when Megatron spells it otherwise than ``--field-name``.  ``cli=False``: filled by code, not a flag.
    ``parse``: how the flag's text (or a --config value) becomes the value, for a field no one type describes.
    """
    return field(default=default, metadata={"help": help, "at_least": at_least, "above": above,
                                            "at_most": at_most, "below": below, "name": name, "cli": cli,
                                            "parse": parse})


def flag_name(f) -> str:
    return f.metadata.get("name") or "--" + f.name.replace("_", "-")


def choices(annotation) -> Optional[tuple]:
    """The allowed values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) annotation, else None."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    for arg in get_args(annotation):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return None


def check_fields(config) -> None:
    """Each field parsed (a field declared with ``parse``), then checked against its declared choices,
    finiteness (NaN passes every comparison) and range (a None value is 'use the default')."""
    hints = get_type_hints(type(config))
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None:
            continue
        if meta.get("parse") is not None:   # a value given in code as the flag's text reads as the flag would
            value = meta["parse"](value)
            setattr(config, f.name, value)
        allowed = choices(hints[f.name])
        if allowed is not None and value not in allowed:
            raise ValueError(f"{flag_name(f)} {value!r}: choose one of {', '.join(allowed)}")
        if isinstance(value, (bool, str, list)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag_name(f)} must be a finite number, got {value}")
        for key, fails, words in (("at_least", lambda v, b: v < b, "at least"), ("above", lambda v, b: v <= b, "above"),
                                  ("at_most", lambda v, b: v > b, "at most"), ("below", lambda v, b: v >= b, "below")):
            bound = meta.get(key)
            if bound is not None and fails(value, bound):
                raise ValueError(f"{flag_name(f)} must be {words} {bound:g}, got {value}")


class FieldParser:
    """A field's own ``parse`` as an argparse type, its one-line refusal kept (argparse would replace a
    ValueError's text); :meth:`from_config` reads a --config value (a list too) with it."""

    def __init__(self, parse: Callable[[Any], Any], name: str):
        self.parse, self.name, self.__name__ = parse, name, parse.__name__

    def __call__(self, value):
        try:
            return self.parse(value)
        except ValueError as error:   # argparse puts "argument --flag: " before it
            raise argparse.ArgumentTypeError(str(error).removeprefix(self.name + " ")) from None

    def from_config(self, path: str, value):
        try:
            return self.parse(value)
        except ValueError as error:
            raise ValueError(f"--config {path}: {error}") from None
