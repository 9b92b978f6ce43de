"""Command-line options derived from the pydantic configs, so that a config field is a flag without glue.

A command names the configs it builds as `Section`s (`Section("listing", ListingConfig)`). Then:
- `config_flag(parser, "--min-duration", listing, "min_duration_s")` adds one of DESIGN.md's flags: its type,
  choices (a Literal), default and help come from the field;
- `add_config_options(parser, listing)` adds a dotted option for every scalar field, nested configs included
  (`--listing.limit`, `--train.lr`, `--train.loader.batch-size`), in an argument group of its own;
- `build_config(args, listing)` turns the parsed options back into the config: only the options the user gave
  override the defaults (or the preset's values, for a config with presets).

Both kinds of option store into the same place (`args.<section>.<field path>`, absent unless given), so
`--batch-size 4` and `--train.loader.batch-size 4` are one setting. An optional field also takes `none`.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Union, get_args, get_origin

if TYPE_CHECKING:  # pydantic is imported when a command's options are built: `fvlm --help` needs none of it
    from pydantic import BaseModel
    from pydantic.fields import FieldInfo

NONE_WORDS = ("none", "None", "null")


@dataclass(frozen=True)
class Section:
    """One config a command builds: `name` prefixes its dotted options and the places they are parsed into."""

    name: str
    config: type[BaseModel]

    def dest(self, path: str) -> str:
        return f"{self.name}.{path}"


# ---- fields ---------------------------------------------------------------------------------------------


def field_at(config: type[BaseModel], path: str) -> FieldInfo:
    """The field of `config` at a dotted path ('loader.batch_size')."""
    *parents, last = path.split(".")
    for name in parents:
        config = typing.cast("type[BaseModel]", config.model_fields[name].annotation)
    if last not in config.model_fields:
        raise KeyError(f"{config.__name__} has no field {last!r}")
    return config.model_fields[last]


def leaf_fields(config: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted path, field) of every field that is not itself a config, nested configs walked through."""
    from pydantic import BaseModel

    for name, field in config.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from leaf_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_none(text: str) -> Any:
        return None if text in NONE_WORDS else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")  # argparse names it in "invalid int value"
    return parse_or_none


def value_kwargs(annotation: Any) -> dict[str, Any] | None:
    """argparse keywords (type, choices, nargs, action) that parse a value of `annotation`; None: not a scalar."""
    optional = get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)
    if optional:
        others = [a for a in get_args(annotation) if a is not type(None)]
        if len(others) != 1:
            return None
        annotation = others[0]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        kwargs: dict[str, Any] = {"type": type(args[0]), "choices": list(args)}
    elif annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    elif annotation in (int, float, str):
        kwargs = {"type": annotation, "metavar": {int: "N", float: "X", str: "TEXT"}[annotation]}
    elif origin is tuple and args and Ellipsis not in args and len(set(args)) == 1 and args[0] in (int, float, str):
        kwargs = {"type": args[0], "nargs": len(args), "metavar": args[0].__name__.upper()}
    else:
        return None
    if optional:
        kwargs["type"] = _or_none(kwargs["type"])
        if "choices" in kwargs:
            kwargs["choices"].append(None)
    return kwargs


# ---- defaults shown in the help ---------------------------------------------------------------------------


@functools.cache
def _defaults(config: type[BaseModel]) -> dict[str, BaseModel]:
    """The config as each preset makes it, or its plain defaults ({"": config()}) for a config without presets."""
    presets = getattr(config, "PRESETS", None)
    if presets is None:
        return {"": config()}
    return {name: config.for_preset(name) for name in presets}  # type: ignore[attr-defined]


def _value_at(config: BaseModel, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return str(value)


def default_text(config: type[BaseModel], path: str) -> str:
    """'20.0', or 'demo 8, full 64' where the presets differ."""
    values = {name: _show(_value_at(instance, path)) for name, instance in _defaults(config).items()}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{name} {value}" for name, value in values.items())


def _help(field: FieldInfo, text: str | None, default: str) -> str:
    described = " ".join((text or field.description or "").split())
    return f"{described} (default: {default})".replace("%", "%%")


# ---- adding options -------------------------------------------------------------------------------------


def config_flag(parser: Any, flag: str, section: Section, path: str, *, dest: str | None = None,
                help: str | None = None) -> argparse.Action:
    """A flag whose type, choices, default and help come from the field at `path` of the section's config.

    Without `dest` the value overrides that field in `build_config` (and is absent unless given); with `dest`
    it is a plain argument of the command, `args.<dest>`, whose default is the field's.
    """
    field = field_at(section.config, path)
    kwargs = value_kwargs(field.annotation)
    if kwargs is None:
        raise TypeError(f"{section.config.__name__}.{path} ({field.annotation}) has no command-line form")
    if dest is None:
        kwargs.update(dest=section.dest(path), default=argparse.SUPPRESS)
        shown = default_text(section.config, path)
    else:
        kwargs.update(dest=dest, default=field.get_default(call_default_factory=True))
        shown = _show(kwargs["default"])
    return parser.add_argument(flag, help=_help(field, help, shown), **kwargs)


def add_config_options(parser: argparse.ArgumentParser, section: Section, exclude: tuple[str, ...] = ("preset",),
                       ) -> argparse._ArgumentGroup:
    """`--<section>.<field>` for every scalar field of the section's config (nested: `--train.loader.batch-size`)."""
    group = parser.add_argument_group(
        f"{section.name} options", f"every field of {section.config.__name__}; only the options given override "
                                   "its defaults")
    for path, field in leaf_fields(section.config):
        if path in exclude or value_kwargs(field.annotation) is None:
            continue
        flag = "--" + ".".join([section.name, *(part.replace("_", "-") for part in path.split("."))])
        config_flag(group, flag, section, path)
    return group


# ---- back to configs ------------------------------------------------------------------------------------


def section_values(args: argparse.Namespace, section: Section) -> dict[str, Any]:
    """The options of a section the user gave, nested as the config's fields are ({"loader": {"batch_size": 4}})."""
    nested: dict[str, Any] = {}
    prefix = section.name + "."
    for dest, value in vars(args).items():
        if not dest.startswith(prefix):
            continue
        *parents, last = dest[len(prefix):].split(".")
        place = nested
        for name in parents:
            place = place.setdefault(name, {})
        place[last] = value
    return nested


def build_config(args: argparse.Namespace, section: Section, preset: str | None = None) -> Any:
    """The section's config: its preset's values (or its defaults), with the options the user gave over them."""
    values = section_values(args, section)
    if preset is not None:
        return section.config.for_preset(preset, **values)  # type: ignore[attr-defined]
    return section.config.model_validate(values)


def flow_parameters(flow: Any) -> type[BaseModel]:
    """A config of a Prefect flow's parameters: types and defaults from its signature, help from its docstring."""
    from pydantic import Field, create_model

    hints = typing.get_type_hints(flow.fn)
    described = flow.parameters.properties
    fields: dict[str, Any] = {}
    for name, parameter in inspect.signature(flow.fn).parameters.items():
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[name] = (hints[name], Field(default, description=described.get(name, {}).get("description")))
    return create_model(f"{flow.name.title()}FlowParameters", **fields)
