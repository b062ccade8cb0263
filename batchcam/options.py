"""One table of options: each command-line option is declared once, everything else derives from it.

An ``Option`` says what an option is: its flag, type, help, validation, and whether it changes a
row's content (``affects_rows``, required, so a new option cannot leave it unsaid). A command's
frozen configuration (``config.ScanConfig`` ...) binds it with one typed line giving that command's
default, and its field is named as the option's ``dest`` (checked when the class is made):

    batch_size: int = BATCH_SIZE.field(32)

From the bindings come the command's argparse arguments (``add_arguments``), the configuration built
from the parsed values (``from_values``), validation (``Config.validate``), the manifest's settings
(``settings``) and the values the row-reuse key is made of (``row_settings``, keyed by
``report.store``). Options that make one value together (``--select``, ``--modalities`` and
``--views`` make ``config.Selection``) are a ``Group``; a configuration class nested in another
(``nested``) is one too. Nothing heavy is imported: the command line builds all this at once.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from batchcam.errors import UsageError

T = TypeVar("T")
G = TypeVar("G")
C = TypeVar("C", bound="Config")

BINDING, GROUP = "batchcam.option", "batchcam.group"   # keys of a configuration field's metadata


def path_argument(text: str) -> Path:
    """The parser of every path: an empty one is refused (``Path("")`` would be the working directory)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names nothing (it would mean the working directory)")
    return Path(text)


@dataclass(frozen=True, kw_only=True)
class Option(Generic[T]):
    """A command-line option, as every command that takes it shares it.

    ``parse`` turns the text into the value (None: a switch, present or not); ``check(name, value)``
    raises UsageError for a value out of bounds (``name`` is the flag, or a positional's metavar);
    ``none_means`` says in ``--help`` what leaving out an option whose default is None does;
    ``keyed_resolved``: the row key holds what the run resolved the value to (``--precision auto``
    keyed as fp32 on the CPU), given to ``row_settings``.
    """

    flag: str                                  # "--batch-size", or a positional's name ("root")
    help: str                                  # "{default}" marks where the default is said; else it ends it
    affects_rows: bool                         # changes a row's content: part of the row-reuse key
    parse: Callable[[str], T] | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    check: Callable[[str, T], None] | None = None
    none_means: str | None = None
    keyed_resolved: bool = False
    dest: str = ""                             # the field's name; from the flag unless given ("--import")

    def __post_init__(self) -> None:
        if not self.dest:
            object.__setattr__(self, "dest", self.flag.lstrip("-").replace("-", "_"))
        if self.keyed_resolved and not self.affects_rows:
            raise ValueError(f"{self.flag}: only an option that affects rows is keyed")

    @property
    def positional(self) -> bool:
        return not self.flag.startswith("-")

    @property
    def is_switch(self) -> bool:
        return self.parse is None

    @property
    def name(self) -> str:
        """How messages name it: the flag, or a positional's metavar (``ROOT``)."""
        if self.positional:
            return self.metavar or self.flag.upper()
        return self.flag

    def validate(self, value: T | None) -> None:
        if value is None:
            return  # left out: what none_means says
        if self.choices:
            check_choice(self.name, str(value), self.choices)
        if self.check is not None:
            self.check(self.name, value)

    def bound(self, default: Any = MISSING) -> Binding:
        return Binding(self, default)

    def field(self, default: T) -> T:
        """This option in a configuration, with this command's default."""
        return _field(Binding(self, default))

    def optional(self) -> T | None:
        """This option in a configuration, None when left out (``none_means`` says what that does)."""
        return _field(Binding(self, None))

    def required(self) -> T:
        """This option in a configuration, which the command cannot run without (no default)."""
        return _field(Binding(self, MISSING))

    def many(self) -> tuple[T, ...]:
        """A positional given one or more times (``predict FILE...``)."""
        return _field(Binding(self, MISSING, many=True))

    def derived(self, rule: Callable[[Any], T], shown: str) -> T:
        """A default that depends on other options: ``rule(config)`` when left out; ``shown`` says it in --help."""
        return _field(Binding(self, None, rule=rule, shown=shown))


def switch(flag: str, help: str, *, affects_rows: bool) -> Option[bool]:
    """An option that is on when given (``--full``); off by default."""
    return Option[bool](flag=flag, help=help, affects_rows=affects_rows)


@dataclass(frozen=True)
class Binding:
    """An option as one command takes it: its default there (MISSING: required)."""

    option: Option[Any]
    default: Any = MISSING
    rule: Callable[[Any], Any] | None = None
    shown: str | None = None
    many: bool = False

    @property
    def required(self) -> bool:
        return self.default is MISSING and self.rule is None

    def shown_default(self) -> str | None:
        """The default as ``--help`` states it, or None when there is none to state."""
        if self.option.is_switch or self.required:
            return None
        if self.rule is not None:
            return self.shown
        if self.default is None:
            return self.option.none_means
        return shown_value(self.default)

    def help(self) -> str:
        """The option's help for argparse, saying the default once: where ``{default}`` stands, else at the end.

        A default shown as argparse shows it is written ``%(default)s``, argparse's own way of saying it, so
        a parser with ``ArgumentDefaultsHelpFormatter`` (train_model.py's) does not say it again.
        """
        text, default = self.option.help.replace("%", "%%"), self.shown_default()
        if default is not None:
            default = "%(default)s" if default == str(self.default) else default.replace("%", "%%")
        if "{default}" in text:
            if default is None:
                raise ValueError(f"{self.option.flag}: its help says its default, but it has none")
            text = text.replace("{default}", default)
        elif default is not None:
            text = f"{text} (default: {default})"
        return text


def shown_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _field(binding: Binding) -> Any:
    if binding.default is MISSING and binding.rule is None:
        return dataclasses.field(metadata={BINDING: binding})
    return dataclasses.field(default=binding.default, metadata={BINDING: binding})


@dataclass(frozen=True)
class Group(Generic[G]):
    """Options that make one value together: ``build(**values by dest)`` makes it, ``values(it)`` gives
    each option's value back as it would be typed (the manifest's settings).

    ``decided_per_row``: each row records the group's ``key`` (``records.Row.selection``) and the plan
    decides again only the rows it decided (``report.store.make_plan``), so the group is not part of
    the run's row key although its options affect rows.
    """

    bindings: tuple[Binding, ...]
    build: Callable[..., G]
    values: Callable[[G], dict[str, Any]]
    decided_per_row: bool = False

    def field(self, default: G) -> G:
        result: G = dataclasses.field(default=default, metadata={GROUP: self})
        return result

    def from_values(self, values: Mapping[str, Any]) -> G:
        return self.build(**{binding.option.dest: values[binding.option.dest] for binding in self.bindings})


def nested(default: C) -> C:
    """A configuration class inside another (``ScanConfig.measures``): its options are the command's too."""
    config_class = type(default)
    group = Group(tuple(config_bindings(config_class)), lambda **values: from_values(config_class, values),
                  option_values)
    result: C = dataclasses.field(default=default, metadata={GROUP: group})
    return result


class Config:
    """The base of every command's configuration (a frozen, keyword-only dataclass of bound options).

    Making a subclass checks that each option's field is named as its dest; constructing one applies
    the options' derived defaults; ``validate`` checks every option, then the class's own ``check``.
    """

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every subclass is a dataclass

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in vars(cls).items():
            binding = value.metadata.get(BINDING) if isinstance(value, dataclasses.Field) else None
            if binding is not None and binding.option.dest != name:
                raise TypeError(f"{cls.__name__}.{name} binds {binding.option.flag}: name the field "
                                f"{binding.option.dest}")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            binding = field.metadata.get(BINDING)
            if binding is not None and binding.rule is not None and getattr(self, field.name) is None:
                object.__setattr__(self, field.name, binding.rule(self))

    def validate(self) -> None:
        """UsageError (exit 2) for the first option out of bounds, then for options that do not go together."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if BINDING in field.metadata:
                field.metadata[BINDING].option.validate(value)
            elif isinstance(value, Config):
                value.validate()
        self.check()

    def check(self) -> None:
        """What a class checks across its options (``--compile`` with ``--backend onnx``)."""


def config_bindings(config_class: type) -> Iterator[Binding]:
    """Every option a configuration class takes, its groups' too, in the order --help lists them."""
    for field in dataclasses.fields(config_class):
        if BINDING in field.metadata:
            yield field.metadata[BINDING]
        elif GROUP in field.metadata:
            yield from field.metadata[GROUP].bindings


def add_arguments(parser: argparse.ArgumentParser, bindings: Iterator[Binding] | tuple[Binding, ...]) -> None:
    """argparse arguments for ``bindings`` (``config_bindings(ScanConfig)``), each default said once."""
    for binding in bindings:
        option = binding.option
        arguments: dict[str, Any] = {"help": binding.help()}
        if option.is_switch:
            arguments["action"] = "store_true"
        else:
            arguments.update(type=option.parse, metavar=option.metavar)
            if option.choices:
                arguments["choices"] = option.choices
            if binding.many:
                arguments["nargs"] = "+"
            elif not binding.required:
                arguments["default"] = binding.default
        if option.positional:
            parser.add_argument(option.dest, **arguments)
        else:
            parser.add_argument(option.flag, dest=option.dest, required=binding.required, **arguments)


def from_values(config_class: type[C], values: Mapping[str, Any], **others: Any) -> C:
    """The configuration of the options' parsed ``values`` (by dest: ``vars(namespace)``), and ``others``
    (fields that are no option: ``ScanConfig.argv``)."""
    arguments: dict[str, Any] = dict(others)
    for field in dataclasses.fields(config_class):
        if BINDING in field.metadata:
            value = values[field.name]
            arguments[field.name] = tuple(value) if field.metadata[BINDING].many else value
        elif GROUP in field.metadata:
            arguments[field.name] = field.metadata[GROUP].from_values(values)
    return config_class(**arguments)


def option_values(config: Any) -> dict[str, Any]:
    """Each option's value in ``config``, its groups' too, by dest."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        if BINDING in field.metadata:
            values[field.name] = getattr(config, field.name)
        elif GROUP in field.metadata:
            values.update(field.metadata[GROUP].values(getattr(config, field.name)))
    return values


def settings(config: Any, resolved: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every option's value as the run used it, as JSON (the manifest's ``settings``): ``resolved``
    holds what the run resolved (``device``: ``cuda:0`` for ``auto``)."""
    values = option_values(config)
    unknown = set(resolved or {}) - set(values)
    if unknown:
        raise ValueError(f"not options of {type(config).__name__}: {', '.join(sorted(unknown))}")
    return {dest: plain(value) for dest, value in {**values, **(resolved or {})}.items()}


def row_settings(config: Any, resolved: Mapping[str, Any]) -> dict[str, Any]:
    """What the row-reuse key is made of: every option that affects rows, outside groups decided row by
    row; those ``keyed_resolved`` as ``resolved`` gives them (``model``: what the model contributes)."""
    keyed: dict[str, Any] = {}
    for binding in row_bindings(type(config)):
        option = binding.option
        if option.keyed_resolved:
            if option.dest not in resolved:
                raise ValueError(f"{option.flag} is keyed by its resolved value, which the run did not give")
            keyed[option.dest] = plain(resolved[option.dest])
        else:
            keyed[option.dest] = plain(option_values(config)[option.dest])
    unknown = set(resolved) - set(keyed)
    if unknown:
        raise ValueError(f"resolved values of no keyed option: {', '.join(sorted(unknown))}")
    return keyed


def row_bindings(config_class: type) -> Iterator[Binding]:
    """The bindings whose options make the run's row key: those that affect rows, except in groups decided
    row by row."""
    for field in dataclasses.fields(config_class):
        if BINDING in field.metadata:
            bindings: tuple[Binding, ...] = (field.metadata[BINDING],)
        elif GROUP in field.metadata and not field.metadata[GROUP].decided_per_row:
            bindings = field.metadata[GROUP].bindings
        else:
            continue
        yield from (binding for binding in bindings if binding.option.affects_rows)


def plain(value: Any) -> Any:
    """A value as JSON holds it: paths as text, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    return value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name} {value!r} is not one of: {', '.join(choices)}")
