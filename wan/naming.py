"""Arguments named in error messages.

wan names its arguments as `name=value` (`offload='blocks'`, `ulysses_size=3`) or by their bare
name (`sampling_steps must be >= 1`), never as a command-line flag. An error that names
arguments carries them as `Arg`s beside its message template (`NamedError`), so a caller says
them its own way without rewriting text: `str(err)` in API words, `err.say(fn)` with `fn(arg)`
for each (the CLIs: the flags a user types, from one table, wan_triton.flag_words).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["Arg", "Text", "NamedError"]

_BARE = object()


@dataclass(frozen=True)
class Arg:
    """One argument as a message names it: `name=value` (the value as Python writes it, or as
    it is when `literal`: a placeholder such as `<folder>`), or the bare `name` (no value)."""
    name: str
    value: object = _BARE
    literal: bool = False

    @property
    def bare(self) -> bool:
        return self.value is _BARE

    def __str__(self) -> str:
        if self.bare:
            return self.name
        return f"{self.name}={self.value if self.literal else repr(self.value)}"


def _fill(value, say: Callable[[Arg], str]):
    if isinstance(value, Arg):
        return say(value)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, Arg) for v in value):
        return ", ".join(say(v) for v in value)
    return value


def _say(template: str, fields: dict, say_arg: Callable[[Arg], str]) -> str:
    if not fields:
        return template
    return template.format(**{k: _fill(v, say_arg) for k, v in fields.items()})


class Text:
    """A one-line message that names arguments, not raised (a warning for the log): `template` is
    `str.format` text whose fields are `Arg`s (a list of them is said joined by ', ') or plain
    facts. `str(text)` says each Arg in API words; `text.say(fn)` as `fn(arg)`."""

    def __init__(self, template: str, **fields):
        self.template, self.fields = template, fields

    def say(self, say_arg: Callable[[Arg], str] = str) -> str:
        return _say(self.template, self.fields, say_arg)

    def __str__(self) -> str:
        return self.say()

    def __repr__(self) -> str:
        return f"Text({self.say()!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Text) and (self.template, self.fields) == (other.template, other.fields)

    def __hash__(self) -> int:
        return hash(self.template)


class NamedError(ValueError):
    """An error whose one-line message names arguments, as a `Text` does (a message without
    fields is used as it is). `str(err)` says each Arg in API words; `err.say(fn)` as `fn(arg)`."""

    def __init__(self, template: str, **fields):
        self.template, self.fields = template, fields
        super().__init__(self.say())

    def say(self, say_arg: Callable[[Arg], str] = str) -> str:
        return _say(self.template, self.fields, say_arg)
