"""``--moe-layer-freq``'s value, as Megatron-LM reads it, without evaluating code.

Megatron accepts an integer N (layer i holds experts when i % N == 0) or a Python list expression with one
entry per layer, 1 for an MoE layer and 0 for a dense one::

    2                   -> 2                          (every other layer, from layer 0)
    "[1,0,1,0]"         -> [1, 0, 1, 0]
    "([1]*3+[0]*1)*2"   -> [1, 1, 1, 0, 1, 1, 1, 0]

Megatron evaluates the expression with Python after checking that it uses only digits, commas, brackets,
parentheses, ``+`` and ``*``.  Here it is parsed with :mod:`ast` and only these nodes are computed: integer
literals, list displays of them, ``+`` (integers, or lists concatenated) and ``*`` (integers, or a list
repeated an integer number of times), so the same strings give the same lists and nothing else runs.  The
list's length against ``--num-layers`` is checked with the other MoE rules (moe_settings.py).
"""
from __future__ import annotations

import ast
import re
from typing import List, Union

__all__ = ["moe_freq_type"]

_LONGEST = 1_000_000          # a pattern's length or factor beyond any model (no huge list from "[1]*10**9")
_ALLOWED = re.compile(r"[\d,\[\]()+*\s]*")


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"--moe-layer-freq {text!r}: {why}; give an integer N or a list of 0/1 per layer such as "
                      f"'([1]*3+[0]*1)*3'")


def _value(node: ast.AST, text: str) -> Union[int, List[int]]:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.List):
        items = [_value(item, text) for item in node.elts]
        if not all(isinstance(item, int) for item in items):
            raise _bad(text, "a list holds integers only")
        return items
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _value(node.left, text), _value(node.right, text)
        if isinstance(node.op, ast.Add):
            if isinstance(left, list) != isinstance(right, list):
                raise _bad(text, "'+' adds two integers or joins two lists")
            result = left + right
        else:
            if isinstance(left, list) and isinstance(right, list):
                raise _bad(text, "'*' repeats a list an integer number of times")
            pattern = left if isinstance(left, list) else right
            if isinstance(pattern, list) and len(pattern) * (right if pattern is left else left) > _LONGEST:
                raise _bad(text, "the list is longer than any model")   # checked before it is built
            result = left * right
        if isinstance(result, list) and len(result) > _LONGEST:
            raise _bad(text, "the list is longer than any model")
        return result
    raise _bad(text, "only integers, lists, '+', '*' and parentheses are read")


def moe_freq_type(value: Union[int, str, List[int]]) -> Union[int, List[int]]:
    """An integer (or its digits) as the integer, a list expression (or a list) as the list of 0/1 per layer;
    ValueError naming the value otherwise."""
    if isinstance(value, list):
        text = str(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(value, str):
        text = value
    else:
        raise _bad(str(value), "not an integer or a list")
    if "[" not in text:   # as Megatron: without a list, the integer's digits
        try:
            return int(text)
        except ValueError:
            raise _bad(text, "not an integer") from None
    if not _ALLOWED.fullmatch(text):
        raise _bad(text, "only digits, ',', '[', ']', '(', ')', '+' and '*' are read")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise _bad(text, "not a valid expression") from None
    result = _value(tree.body, text)
    if isinstance(result, list) and any(entry not in (0, 1) for entry in result):
        raise _bad(text, "each layer's entry is 1 (experts) or 0 (dense)")
    return result
