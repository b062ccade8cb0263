"""How the fields of a row become columns, each declared once, beside the field it describes.

A field of a row dataclass declares its column in its metadata, a value computed from other fields
is a property marked with ``@derived``, and a field without a declaration (the row store's
bookkeeping) is no column at all:

    confidence: float | None = field(default=None, metadata=column(Number(), reported=True))

    @property
    @derived(Flag(), after="label")
    def correct(self) -> bool | None: ...

A declaration says how the value is written to and read from a CSV cell and which pandas dtype it
gets (its kind: ``Text``, ``Number``, ``Integer``, ``Flag``, ``Choice``, ``ClassName``, ``Time``),
whether it is one column per class (``per_class``: the prefix of ``p_<CLASS>``), whether predict and
serve report it (``reported``: its JSON key) and whether the gallery carries it (``shown``). Everything
else is derived from the declarations by ``Schema``: the CSV's columns and cells, the row read back,
``read_report``'s dtypes, the JSON of ``predict --json`` and serve's API, the gallery's data and its
cards' data attributes, and a digest that changes whenever a declaration does.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from operator import attrgetter
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

COLUMN = "batchcam_column"    # the key of a declaration in a field's metadata or a property getter's __dict__


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---- kinds: a value in a CSV cell and in pandas --------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """How a value is written to a CSV cell and read back; an empty cell is ``empty``."""

    dtype: ClassVar[str] = "string"     # read_report's dtype (report.reader converts by it)
    empty: ClassVar[Any] = ""

    def write(self, value: Any) -> str:
        return "" if value is None else str(value)

    def read(self, text: str) -> Any:
        """The value of a cell that is not empty."""
        return text

    def categories(self, class_names: Sequence[str]) -> tuple[str, ...]:
        """A categorical column's categories, in order (only ``dtype == "category"`` has any)."""
        return ()


@dataclass(frozen=True)
class Text(Kind):
    """Text as it is; ``one_line``: every run of whitespace written as one space (reasons, messages)."""

    one_line: bool = False

    def write(self, value: str) -> str:
        return one_line(value) if self.one_line else value


@dataclass(frozen=True)
class Choice(Kind):
    """Text that is one of ``choices``, or empty; a categorical in pandas."""

    choices: tuple[str, ...] = ()
    dtype: ClassVar[str] = "category"

    def categories(self, class_names: Sequence[str]) -> tuple[str, ...]:
        return self.choices


@dataclass(frozen=True)
class ClassName(Kind):
    """One of the model's class names, or empty; a categorical in the model's class order."""

    dtype: ClassVar[str] = "category"

    def categories(self, class_names: Sequence[str]) -> tuple[str, ...]:
        return tuple(class_names)


@dataclass(frozen=True)
class Time(Kind):
    """An ISO 8601 time in UTC, kept as text in the row; a UTC datetime in pandas."""

    dtype: ClassVar[str] = "datetime"


@dataclass(frozen=True)
class Number(Kind):
    """A float written with ``digits`` decimals; empty for None."""

    digits: int = 6
    dtype: ClassVar[str] = "float64"
    empty: ClassVar[Any] = None

    def write(self, value: float | int | None) -> str:
        if value is None:
            return ""
        return f"{value:.{self.digits}f}" if isinstance(value, float) else str(value)

    def read(self, text: str) -> float:
        return float(text)


@dataclass(frozen=True)
class Integer(Kind):
    """A whole number (pixels); empty for None; nullable Int64 in pandas."""

    dtype: ClassVar[str] = "Int64"
    empty: ClassVar[Any] = None

    def read(self, text: str) -> int:
        return int(text)


@dataclass(frozen=True)
class Flag(Kind):
    """``true``/``false``, empty for None; a nullable boolean in pandas."""

    dtype: ClassVar[str] = "boolean"
    empty: ClassVar[Any] = None

    def write(self, value: bool | None) -> str:
        return "" if value is None else str(bool(value)).lower()

    def read(self, text: str) -> bool:
        return text == "true"


# ---- declarations ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shown:
    """How the gallery carries a column: in its data (``rows.js`` and each page's rows), as the card's
    ``data-<attribute>`` when ``attribute`` is set, rounded to ``digits`` when set."""

    attribute: str = ""
    digits: int | None = None


@dataclass(frozen=True)
class Column:
    """One column of a row, as declared (the name is the field's or the property's)."""

    kind: Kind
    name: str = ""
    per_class: str = ""             # a prefix: one CSV column <prefix><CLASS> per class, the value a list
    reported: bool | str = False    # in predict --json and serve's API: True under its name, a string under that key
    shown: Shown | None = None      # in the gallery's data; None: not
    after: str = ""                 # a derived column: the column it follows in the CSV
    required: bool = False          # a field without a default: the CSV must have it
    getter: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)  # a derived column's

    @property
    def report_key(self) -> str:
        """Its key in predict --json and serve's API; "" when not reported."""
        if self.reported is True:
            return self.name
        return self.reported if isinstance(self.reported, str) else ""

    @property
    def stored(self) -> bool:
        """A field of the row (read back from the CSV), not a value computed from the others."""
        return self.getter is None

    def value(self, row: Any) -> Any:
        return getattr(row, self.name) if self.getter is None else self.getter(row)

    def csv_names(self, class_names: Sequence[str]) -> list[str]:
        return [f"{self.per_class}{name}" for name in class_names] if self.per_class else [self.name]

    def declaration(self) -> list[Any]:
        """What the row format's digest covers: the name, how the value is written, where it sits."""
        return [self.name, repr(self.kind), self.per_class, self.after]


def column(kind: Kind, *, per_class: str = "", reported: bool | str = False,
           shown: Shown | None = None) -> dict[str, Column]:
    """A field's column declaration, for ``dataclasses.field(metadata=...)``.

    ``reported``: True reports it under the field's name, a string under that key.
    """
    return {COLUMN: Column(kind, per_class=per_class, reported=reported, shown=shown)}


Getter = TypeVar("Getter", bound=Callable[..., Any])


def derived(kind: Kind, *, after: str, reported: bool | str = False,
            shown: Shown | None = None) -> Callable[[Getter], Getter]:
    """Declare a property's getter a derived column, written in the CSV after the column ``after``."""
    def declare(getter: Getter) -> Getter:
        vars(getter)[COLUMN] = Column(kind, after=after, reported=reported, shown=shown, getter=getter)
        return getter
    return declare


# ---- the schema of a row type ---------------------------------------------------------------------

@dataclass(frozen=True)
class CsvColumn:
    """One column of the CSV as pandas reads it."""

    name: str
    dtype: str
    categories: tuple[str, ...] = ()


class Cells(NamedTuple):
    """A column's CSV cells for given class names, and how its value is got, written and read."""

    column: Column
    get: Callable[[Any], Any]
    names: list[str]
    write: Callable[[Any], str]
    read: Callable[[str], Any]


RowT = TypeVar("RowT")


class Schema(Generic[RowT]):
    """The columns of a row dataclass, in CSV order, and everything derived from them."""

    def __init__(self, row_type: type[RowT]):
        if not is_dataclass(row_type):
            raise TypeError(f"{row_type.__name__} is not a dataclass")
        self.row_type = row_type
        self.columns = declared_columns(row_type)
        self.fields = [(f.name, str(f.type)) for f in fields(row_type)]   # what the row store keeps
        self.shown = [column for column in self.columns if column.shown is not None]
        self._layouts: dict[tuple[str, ...], list[Cells]] = {}

    def _layout(self, class_names: Sequence[str]) -> list[Cells]:
        """Each column's cells for these classes, made once (a CSV of 50,000 rows asks 50,000 times)."""
        key = tuple(class_names)
        if key not in self._layouts:
            self._layouts[key] = [Cells(column, column.getter or attrgetter(column.name), column.csv_names(key),
                                        column.kind.write, column.kind.read) for column in self.columns]
        return self._layouts[key]

    # the CSV

    def csv_names(self, class_names: Sequence[str]) -> list[str]:
        return [name for cells in self._layout(class_names) for name in cells.names]

    def to_csv(self, row: RowT, class_names: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for cells in self._layout(class_names):
            value = cells.get(row)
            if len(cells.names) == 1 and not cells.column.per_class:
                found[cells.names[0]] = cells.write(value)
            else:
                found.update(zip(cells.names, map(cells.write, value or [None] * len(cells.names))))
        return found

    def from_csv(self, texts: Mapping[str, str | None], class_names: Sequence[str]) -> RowT:
        """The row a CSV line holds; a column the line lacks gets its empty value (a required one is a KeyError)."""
        values: dict[str, Any] = {}
        for cells in self._layout(class_names):
            column = cells.column
            if not column.stored:
                continue
            text = texts[cells.names[0]] if column.required else texts.get(cells.names[0])
            if column.per_class:
                values[column.name] = [cells.read(texts.get(name) or "") for name in cells.names] if text else []
            else:
                values[column.name] = cells.read(text) if text else column.kind.empty
        return self.row_type(**values)

    def csv_dtypes(self, class_names: Sequence[str]) -> dict[str, CsvColumn]:
        """Each CSV column's pandas dtype (and categories), by name."""
        return {name: CsvColumn(name, column.kind.dtype, column.kind.categories(class_names))
                for column in self.columns for name in column.csv_names(class_names)}

    # predict --json and serve's API

    def reported(self, row: RowT, class_names: Sequence[str]) -> dict[str, Any]:
        """The reported columns of a row, in CSV order: empty text as None, per-class values as a dict
        by class name (None when there are none)."""
        found: dict[str, Any] = {}
        for cells in self._layout(class_names):
            column = cells.column
            if not column.report_key:
                continue
            value = cells.get(row)
            if column.per_class:
                value = dict(zip(class_names, value)) if value else None
            elif value == "":
                value = None
            found[column.report_key] = value
        return found

    # the gallery

    def shown_values(self, row: RowT) -> list[Any]:
        """The row's values for the gallery's data, in the order of ``shown``."""
        return [_rounded(column.value(row), column.shown.digits) for column in self.shown if column.shown]

    def attributes(self) -> dict[str, str]:
        """Column name -> the card's data attribute (``data-<attribute>``), for the shown columns that have one."""
        return {column.name: column.shown.attribute for column in self.shown if column.shown and column.shown.attribute}

    # the row format

    @property
    def digest(self) -> str:
        """A digest of the declarations and of the row type's fields (what the row store keeps): any
        change to either changes it."""
        text = json.dumps([[column.declaration() for column in self.columns], self.fields])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def declared_columns(row_type: type) -> tuple[Column, ...]:
    """The columns of ``row_type`` in CSV order: its declared fields in field order, each derived
    column after the one it names."""
    found = [replace(f.metadata[COLUMN], name=f.name,
                     required=f.default is MISSING and f.default_factory is MISSING)
             for f in fields(row_type) if COLUMN in f.metadata]
    for name, member in _members(row_type).items():
        getter = member.fget if isinstance(member, property) else None
        if getter is not None and COLUMN in vars(getter):
            placed = replace(vars(getter)[COLUMN], name=name)
            names = [c.name for c in found]
            if placed.after not in names:
                raise ValueError(f"{row_type.__name__}.{name} is declared after {placed.after!r}, which is no column")
            position = names.index(placed.after) + 1
            while position < len(found) and found[position].after == placed.after:
                position += 1       # two derived columns after one column keep their order
            found.insert(position, placed)
    names = [c.name for c in found]
    if len(set(names)) != len(names):
        raise ValueError(f"{row_type.__name__} declares a column twice: {names}")
    return tuple(found)


def _members(row_type: type) -> dict[str, Any]:
    """Class attributes of ``row_type`` and its bases, a subclass's overriding its base's."""
    members: dict[str, Any] = {}
    for klass in reversed(row_type.__mro__):
        members.update(vars(klass))
    return members


def _rounded(value: Any, digits: int | None) -> Any:
    return round(value, digits) if digits is not None and isinstance(value, float) else value
