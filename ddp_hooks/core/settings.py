"""An algorithm's hyper-parameters: one frozen dataclass per algorithm, the single place where
each of them is named, typed, given its default, its valid range and its documentation.

A field is declared with :func:`setting`::

    @dataclass(frozen=True, kw_only=True)
    class PowerSGDSettings(Settings):
        rank: int = setting(4, Int(1, 1024), "target rank r (each matrix uses min(n, m, r))")

Building the dataclass validates every field by its rule (a ``ValueError`` naming the argument
and the values it accepts) and then :meth:`Settings.check` checks the rules between fields. The
state keeps the instance as ``state.settings``; its :meth:`Settings.identity` is what every rank
must share (:mod:`.agree`) and what a checkpoint records (:mod:`.checkpoint`), and
:meth:`Settings.describe` writes the ``Args:`` section of the state's docstring.
"""

import inspect
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from numbers import Integral
from typing import Any, Protocol, TypeVar

from typing_extensions import Self

from .checks import MAX_COUNT, MAX_SEED, check_bool, check_choice, check_float, check_int, span

T = TypeVar("T")


class Rule(Protocol):
    """What a field accepts: returns the value in its canonical type, or raises ValueError."""

    def __call__(self, name: str, value: Any) -> Any: ...

    def describe(self) -> str:
        """The accepted values, for the documentation."""
        ...


@dataclass(frozen=True)
class Int:
    """An integer in ``[low, high]``."""

    low: int
    high: int = MAX_COUNT

    def __call__(self, name: str, value: Any) -> int:
        return check_int(name, value, self.low, self.high)

    def describe(self) -> str:
        return f"an integer in {span(self.low, self.high)}"


#: a generator seed (room left for the per-rank offsets added to it)
SEED = Int(0, MAX_SEED)


@dataclass(frozen=True)
class Float:
    """A finite number in the interval."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, name: str, value: Any) -> float:
        return check_float(name, value, self.low, self.high, low_open=self.low_open, high_open=self.high_open)

    def describe(self) -> str:
        return f"a number in {span(self.low, self.high, self.low_open, self.high_open)}"


@dataclass(frozen=True)
class Flag:
    """True or False (a string such as ``"False"`` is refused)."""

    def __call__(self, name: str, value: Any) -> bool:
        return check_bool(name, value)

    def describe(self) -> str:
        return "True or False"


@dataclass(frozen=True)
class Choice:
    """One of the strings."""

    choices: tuple[str, ...]

    def __call__(self, name: str, value: Any) -> str:
        return check_choice(name, value, self.choices)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in sorted(self.choices))


@dataclass(frozen=True)
class OneOf:
    """One of a few numbers (``bits`` of 2 or 8)."""

    values: tuple[int, ...]

    def __call__(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, Integral) or value not in self.values:
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return int(value)

    def describe(self) -> str:
        return " or ".join(str(v) for v in self.values)


@dataclass(frozen=True)
class Maybe:
    """None, or what ``rule`` accepts."""

    rule: Rule

    def __call__(self, name: str, value: Any) -> Any:
        return None if value is None else self.rule(name, value)

    def describe(self) -> str:
        return f"None or {self.rule.describe()}"


@dataclass(frozen=True)
class CountOrFraction:
    """A count (an integer >= 1) or a fraction in (0, 1)."""

    def __call__(self, name: str, value: Any) -> int | float:
        if isinstance(value, float) and value < 1:
            return check_float(name, value, 0.0, 1.0, low_open=True, high_open=True)
        return check_int(name, value, 1)

    def describe(self) -> str:
        return "a count (an integer >= 1) or a fraction in (0, 1)"


def setting(default: T, rule: Rule, doc: str) -> T:
    """A field of a :class:`Settings` dataclass: its default, what it accepts, what it does."""
    out: T = field(default=default, metadata={"rule": rule, "doc": doc})
    return out


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Base of every algorithm's settings (a frozen, keyword-only dataclass); no fields of its
    own (the baselines have none)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, f.metadata["rule"](f.name, getattr(self, f.name)))
        self.check()

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> Self:
        """The settings of a constructor's ``locals()``: its arguments that are fields (the
        others, ``self`` and ``runtime``, are not read)."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls) if f.name in arguments})

    def check(self) -> None:
        """The rules between fields (override): raise ValueError naming the argument."""

    def identity(self) -> dict[str, Any]:
        """The values every rank must share and a checkpoint records, by name (override where
        the recorded form differs from the fields)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def redefault(cls, name: str, default: Any, doc: str | None = None) -> Any:
        """A subclass's field ``name``: this class's rule, a new default (and documentation)."""
        base = {f.name: f for f in fields(cls)}[name]
        return field(default=default, metadata={**base.metadata, "doc": doc or base.metadata["doc"]})

    @classmethod
    def describe(cls, names: list[str], indent: str = "    ") -> str:
        """The ``Args:`` entries of the fields ``names``: what each does, accepts, defaults to."""
        lines = []
        by_name = {f.name: f for f in fields(cls)}
        for name in names:
            f = by_name[name]
            text = f"{name}: {f.metadata['doc']} Accepts {f.metadata['rule'].describe()}; default {f.default!r}."
            lines += textwrap.wrap(text, 96, initial_indent=indent, subsequent_indent=indent + "    ")
        return "\n".join(lines)


def constructor_fields(state: type) -> list[str]:
    """The names of the parameters of ``state``'s constructor that are not ``self``,
    ``*args`` or ``**runtime``: each a field of its settings."""
    params = inspect.signature(state.__init__).parameters.values()  # type: ignore[misc]
    return [p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def document(state: type, settings: type[Settings]) -> str:
    """The docstring of ``state`` with the ``Args:`` section written from ``settings``: its
    constructor's parameters must be fields of ``settings``, with the same defaults (else
    TypeError, when the class is defined), and ``**runtime``."""
    fields_by_name = {f.name: f for f in fields(settings)}
    defaults = inspect.signature(state.__init__).parameters  # type: ignore[misc]
    names = constructor_fields(state)
    for name in names:
        f = fields_by_name.get(name)
        if f is None or f.default != defaults[name].default:
            raise TypeError(f"{state.__name__}({name}=...) is not a field of {settings.__name__} with its default")
    args = settings.describe(names, " " * 8)
    runtime = "        **runtime: the options every state takes (:class:`~ddp_hooks.core.Runtime`)."
    doc = (state.__doc__ or "").rstrip()
    return doc + "\n\n    Args:\n" + (args + "\n" if args else "") + runtime + "\n    "
