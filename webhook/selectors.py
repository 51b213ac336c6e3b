"""Label selectors in the string form `kubectl -l` takes.

Supports what apimachinery's `labels.Parse` supports: `k=v`, `k==v`, `k!=v`,
`k in (a,b)`, `k notin (a,b)`, `k` (exists) and `!k` (does not exist), joined by commas.
The original text is kept so the same selector can be sent to the API server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Operator = Literal["=", "!=", "in", "notin", "exists", "!exists"]

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*$")
_EQ = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_VALUE})\s*$")
_EXISTS = re.compile(rf"^\s*(?P<neg>!?)\s*(?P<key>{_KEY})\s*$")


class SelectorError(ValueError):
    """A selector string that is not a valid label selector."""


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        match self.operator:
            case "=" | "in":
                return present and labels[self.key] in self.values
            case "!=" | "notin":
                return not present or labels[self.key] not in self.values
            case "exists":
                return present
            case "!exists":
                return not present
        raise AssertionError(self.operator)


@dataclass(frozen=True, slots=True)
class Selector:
    text: str
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        # A loop, not all() over a generator: on every admission (Python 3.11 makes the
        # generator a frame of its own).
        for requirement in self.requirements:
            if not requirement.matches(labels):
                return False
        return True

    def __str__(self) -> str:
        return self.text


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside a `( … )` value set."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return terms


def parse_selector(text: str) -> Selector:
    requirements = []
    if text.strip():
        for term in _split_terms(text):
            requirements.append(_parse_requirement(term, text))
    return Selector(text.strip(), tuple(requirements))


def _parse_requirement(term: str, text: str) -> Requirement:
    if m := _SET.match(term):
        values = frozenset(v.strip() for v in m["values"].split(","))
        return Requirement(m["key"], "in" if m["op"] == "in" else "notin", values)
    if m := _EQ.match(term):
        return Requirement(m["key"], "!=" if m["op"] == "!=" else "=", frozenset({m["value"]}))
    if m := _EXISTS.match(term):
        return Requirement(m["key"], "!exists" if m["neg"] else "exists")
    raise SelectorError(
        f"invalid label selector {text!r}: cannot parse {term.strip()!r}; "
        "use the form kubectl -l takes, e.g. 'app.kubernetes.io/component=backend'")
