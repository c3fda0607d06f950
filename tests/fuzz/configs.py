"""The config dataclasses' own declarations, for the YAML and flag surfaces: which flags exist, of which
type and range, and :func:`check_configs`, the verdict on configs that parse_args returned."""
from __future__ import annotations

import math
from dataclasses import fields
from typing import List, get_args, get_origin, get_type_hints

from megalite.config.data_spec import parse_blend
from megalite.config.flags import choices, flag_name
from megalite.config.settings import CONFIG_CLASSES
from megalite.data.gpt_dataset import parse_split
from megalite.training.arguments import parse_args
from tests.fuzz.fuzzing import check_one_line, count, silent_accept, traceback_


def _base(annotation):
    """(scalar type, is_list, optional) of a field annotation."""
    optional = type(None) in get_args(annotation)
    if optional:
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    allowed = choices(annotation)
    if allowed is not None:
        return type(allowed[0]), False, optional
    if get_origin(annotation) in (list, List):
        return get_args(annotation)[0], True, optional
    return annotation, False, optional


def flag_fields():
    """[(field, scalar type, is_list, optional, choices)] of every command-line flag."""
    out = []
    for cls in CONFIG_CLASSES:
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.metadata.get("cli", True):
                out.append((f, *_base(hints[f.name]), choices(hints[f.name])))
    return out


def _type_ok(kind, value) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def _range_problem(f, value):
    meta = f.metadata
    for key, fails in (("at_least", lambda v, b: v < b), ("above", lambda v, b: v <= b),
                       ("at_most", lambda v, b: v > b), ("below", lambda v, b: v >= b)):
        if meta.get(key) is not None and fails(value, meta[key]):
            return f"{flag_name(f)} {value!r} is not {key} {meta[key]}"
    return None


def problems(configs) -> List[str]:
    """What is wrong with configs that parse_args accepted (empty: every value is of its type, finite and
    in its declared range and choices)."""
    found = []
    for config in configs:
        hints = get_type_hints(type(config))
        for f in fields(config):
            value = getattr(config, f.name)
            kind, is_list, optional, allowed = *_base(hints[f.name]), choices(hints[f.name])
            if value is None:
                if not optional:
                    found.append(f"{f.name} is None but is not optional")
                continue
            items = value if is_list else [value]
            if is_list and not isinstance(value, list):
                found.append(f"{f.name} {value!r} is not a list")
                continue
            for item in items:
                if not _type_ok(kind, item):
                    found.append(f"{f.name} {item!r} is not a finite {kind.__name__}")
                elif allowed is not None and item not in allowed:
                    found.append(f"{f.name} {item!r} is not one of {allowed}")
                elif kind in (int, float) and _range_problem(f, item):
                    found.append(_range_problem(f, item))
    data = configs[3]
    found += _split_problems(data.split)
    if data.data_path:
        try:
            weights = parse_blend(data.data_path)[1]
        except ValueError as error:
            return found + [f"--data-path {data.data_path} accepted, but the data pipeline refuses it: {error}"]
        if weights is not None and not all(math.isfinite(w) and w > 0 for w in weights):
            found.append(f"--data-path weights {weights} are not finite and positive")
    return found


def _split_problems(split: str) -> List[str]:
    """The split as the user wrote it must be what the data pipeline reads."""
    try:
        written = [float(p) for p in split.replace("/", ",").split(",") if p.strip()]
    except ValueError:
        return [f"--split {split!r} is not numbers"]
    if not all(math.isfinite(w) and w >= 0 for w in written):
        return [f"--split {split!r} holds a non-finite or negative weight"]
    try:
        bounds = parse_split(split)
    except ValueError as error:
        return [f"--split {split!r} accepted, but the data pipeline refuses it: {error}"]
    total, running = sum(written), 0.0
    for weight, bound in zip(written + [0.0] * 3, bounds):
        running += weight
        if bound is None and weight / total > 1e-12 or bound is not None and \
                not math.isclose(bound[1], running / total, rel_tol=1e-9):
            return [f"--split {split!r} is read by the data pipeline as bounds {bounds}"]
    return []


def judge_parse(surface: str, argv, shown) -> str:
    """parse_args on ``argv``: 'accepted' (configs all valid) or 'refused' (one line); raises on a
    traceback or a silent accept, naming ``shown`` (what the case fed in)."""
    try:
        configs = parse_args(argv, world_size=1)
    except ValueError as error:
        check_one_line(surface, str(error))
        return "refused"
    except Exception as error:  # noqa: BLE001 - would reach the user as a traceback
        raise traceback_(surface, error) from error
    found = problems(configs)
    if found:
        raise silent_accept(surface, f"{shown!r}: {found}")
    count(surface, "accepted")
    return "accepted"
