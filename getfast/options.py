"""Command-line options from typed dataclass configs: one ``--option`` per field, parsed strictly.

``add_config(parser, Config)`` adds the options of ``Config``'s fields to an ``argparse`` parser;
``take_config(Config, namespace)`` builds the config from the parsed values (its own checks run then).
Booleans accept exactly true/false, 1/0, yes/no, on/off (and ``--x`` / ``--no-x``); ``X | None`` takes X or the
word ``none``; floats must be finite; a field type the parser does not know is a ``TypeError`` when the parser
is built, so no option reaches a config unparsed.

The checks every config's ``__post_init__`` runs (``check_number``, ``check_choice``, ``check_bool``,
``check_betas``) live here too: one place words the error, naming the option as the user typed it.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import types
import typing

import numpy as np

__all__ = ["add_config", "take_config", "parse_bool", "parse_int", "parse_float", "BOOL_WORDS", "flag",
           "check_number", "check_choice", "check_bool", "check_betas", "check_text", "check_device"]


# --- parsing values ----------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}
BOOL_WORDS = _TRUE | _FALSE


def parse_bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, 1/0, yes/no or on/off, got {s!r}")


def parse_int(s: str) -> int:
    try:
        return int(str(s).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def parse_float(s: str) -> float:
    try:
        v = float(str(s).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def parse_str(s: str) -> str:
    return s


_PARSERS = {bool: parse_bool, int: parse_int, float: parse_float, str: parse_str}


def _optional(parse):
    """``X | None``: the word none (or null) is None, anything else must parse as X."""
    def p(s: str):
        if str(s).strip().lower() in _NONE:
            return None
        return parse(s)
    p.__name__ = getattr(parse, "__name__", "value")
    return p


def _choices(values):
    def p(s: str):
        for v in values:
            if str(v) == s:
                return v
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, values))}, got {s!r}")
    return p


def _field_comments(cls) -> dict[str, str]:
    """``name: type = default  # comment`` lines of a dataclass body -> {name: comment} (the help text)."""
    out = {}
    for klass in reversed(cls.__mro__):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]*=[^#\n]*#\s*(.+)$", src, flags=re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


def _unwrap_optional(tp):
    """(inner type, True) for ``X | None`` / ``Optional[X]``, else (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unions other than X | None are not supported on the command line: {tp}")
    return tp, False


def add_config(parser: argparse.ArgumentParser, cls, skip=()) -> list[str]:
    """One ``--option`` per field of the dataclass ``cls`` (``snake_case`` -> ``--snake-case``), parsed strictly
    from the field's annotation: bool, int, float (finite), str, Literal[...], tuple[T, ...]/tuple[T, T],
    any of these ``| None``. A field of another type is a ``TypeError`` here, so no option escapes parsing.
    Returns the field names added."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None
    group = parser.add_argument_group(cls.__name__, doc)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        flags = (flag, *f.metadata.get("aliases", ()))  # e.g. ConvertConfig.src is also --from
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        tp, optional = _unwrap_optional(hints[f.name])
        kw = {"dest": f.name, "help": comments.get(f.name, " ")}
        if required:
            kw["required"] = True
        else:
            kw["default"] = default
        origin = typing.get_origin(tp)
        if tp is bool:  # --x, --x VALUE, --x=VALUE, and a separate --no-x that takes no value
            group.add_argument(*flags, nargs="?", const=True, type=_optional(parse_bool) if optional else parse_bool,
                               metavar="BOOL" + ("|none" if optional else ""), **kw)
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=False, default=argparse.SUPPRESS,
                               help=f"same as {flag} false")
        elif tp in _PARSERS:
            parse = _PARSERS[tp]
            group.add_argument(*flags, type=_optional(parse) if optional else parse, metavar=tp.__name__.upper(), **kw)
        elif origin is typing.Literal:
            values = typing.get_args(tp)
            group.add_argument(*flags, type=_optional(_choices(values)) if optional else _choices(values),
                               metavar="{" + ",".join(map(str, values)) + "}", **kw)
        elif tp is tuple or origin is tuple:
            args = typing.get_args(tp)
            if args and args[-1] is Ellipsis:
                elem, nargs = args[0], "*"
            elif args:
                if len(set(args)) != 1:
                    raise TypeError(f"{cls.__name__}.{f.name}: mixed tuple {tp} is not supported")
                elem, nargs = args[0], len(args)
            else:  # a bare ``tuple``: elements typed like the default's
                elem = type(default[0]) if default else str
                nargs = "*"
            if elem not in _PARSERS or elem is bool:
                raise TypeError(f"{cls.__name__}.{f.name}: tuple of {elem} is not supported on the command line")
            group.add_argument(*flags, nargs=nargs, type=_PARSERS[elem], metavar=elem.__name__.upper(), **kw)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: type {hints[f.name]} cannot be parsed from the command line")
        added.append(f.name)
    return added


def take_config(cls, ns: argparse.Namespace, **fixed):
    """Build ``cls`` from the parsed options (its ``__post_init__`` checks run here)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in vars(ns).items() if k in names}
    values.update(fixed)
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    return cls(**values)


# --- checks shared by every config -------------------------------------------------------------------

def flag(name: str) -> str:
    """A config field as error messages name it: ``lr_g (--lr-g)``."""
    return f"{name} (--{name.replace('_', '-')})"


def check_number(name: str, value, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                 integer: bool = False, option: bool = True):
    """``value`` if it is a finite number (an int when ``integer``) within the bounds, else ``ValueError``
    naming the option (``option=False``: a function argument, named as is). Bounds are inclusive unless
    ``lo_open``/``hi_open``."""
    label = flag(name) if option else name
    kind = "an integer" if integer else "a finite number"
    ok = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        raise ValueError(f"{label} must be {kind}, got {value!r}")
    bounds = []
    if lo is not None:
        bounds.append(f"> {lo}" if lo_open else f">= {lo}")
        if value < lo or (lo_open and value == lo):
            raise ValueError(f"{label} must be {kind} {' and '.join(bounds)}, got {value!r}")
    if hi is not None:
        bounds.append(f"< {hi}" if hi_open else f"<= {hi}")
        if value > hi or (hi_open and value == hi):
            raise ValueError(f"{label} must be {kind} {' and '.join(bounds)}, got {value!r}")
    return value


def check_text(name: str, value, what: str, *, empty: bool = False) -> str:
    """``value`` if it is a string (non-empty unless ``empty``), else ``ValueError``: "<option> must be <what>"."""
    if not isinstance(value, str) or (not value and not empty):
        raise ValueError(f"{flag(name)} must be {what}, got {value!r}")
    return value


def check_path(name: str, value):
    """``value`` if it is a non-empty path (str or ``os.PathLike``), else ``ValueError`` naming the option."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"{flag(name)} must be a path, got {value!r}")
    return value


def check_device(name: str, value, auto: bool = True) -> str:
    """``value`` if it is spelled auto | cpu | cuda | cuda:N (``auto`` only where ``auto``; whether the device
    exists here is decided where it is used)."""
    names = ("auto", "cpu", "cuda") if auto else ("cpu", "cuda")
    if not isinstance(value, str) or not (value in names or (value.startswith("cuda:") and value[5:].isdigit())):
        raise ValueError(f"{flag(name)} must be {'auto, ' if auto else ''}cpu, cuda or cuda:N, got {value!r}")
    return value


def check_choice(name: str, value, choices):
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{flag(name)} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_bool(name: str, value, optional: bool = False):
    if isinstance(value, bool) or (optional and value is None):
        return value
    allowed = "true, false or None (automatic)" if optional else "true or false"
    raise ValueError(f"{flag(name)} must be {allowed}, got {value!r}")


def check_betas(name: str, value) -> tuple:
    """Adam's (β1, β2), each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{flag(name)} must be two numbers (β1 β2), got {value!r}")
    for b in value:
        check_number(name, b, lo=0, hi=1, hi_open=True)
    return tuple(float(b) for b in value)
