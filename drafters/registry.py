"""The drafter registry: each drafter file registers its name, its options and a builder.

A drafter is named by a spec string ``NAME[:key=value,...]`` (``ngram:depth=4``, ``eagle:path=shipped,tree=dynamic``).
:meth:`DrafterSpec.parse` checks the name and every option against what that drafter registered (types, choices)
and names the problem; :func:`build_drafter` calls the builder. A new drafter needs no edit anywhere else::

    @register("mine", help="...", options=(Option("depth", int, 4, "draft depth"),))
    def _build(target, depth):
        return MyDrafter(target, depth)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SHIPPED = "shipped"  # ``path=shipped``: the weights trained for the embedded SmolLM2-135M-Instruct
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Option:
    """One ``key=value`` option of a drafter: its type, default (``None`` = the drafter's own), help, choices."""

    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()

    def convert(self, drafter: str, value: Any) -> Any:
        if value is None or isinstance(value, self.type):
            converted = value
        else:
            try:
                converted = self.type(value)
            except (TypeError, ValueError):
                raise ValueError(f"option {self.name!r} of drafter {drafter!r} expects {_TYPE_NAMES[self.type]}, "
                                 f"got {value!r}") from None
        if self.choices and converted is not None and converted not in self.choices:
            raise ValueError(f"option {self.name!r} of drafter {drafter!r} must be one of {list(self.choices)}, "
                             f"got {converted!r}")
        return converted


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., Any]
    options: tuple[Option, ...]
    help: str

    def option(self, key: str) -> Option | None:
        return next((o for o in self.options if o.name == key), None)


REGISTRY: dict[str, Entry] = {}


def register(name: str, options: tuple[Option, ...] = (), help: str = "") -> Callable:
    """Decorator: register ``build(target, **options) -> Drafter | None`` under ``name``."""

    def wrap(build: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"drafter {name!r} is registered twice")
        REGISTRY[name] = Entry(name, build, tuple(options), help)
        return build

    return wrap


def drafter_names() -> list[str]:
    return list(REGISTRY)


@dataclass(frozen=True)
class DrafterSpec:
    """A parsed drafter spec: the drafter's ``name`` and its ``options`` (registered keys only; ``None`` = the
    drafter's default). Options read as attributes (``spec.tree``); an option another drafter has reads ``None``."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key in ("name", "options"):
            raise AttributeError(key)
        if key in self.options:
            return self.options[key]
        if any(entry.option(key) for entry in REGISTRY.values()):
            return None
        raise AttributeError(f"no drafter has an option {key!r}")

    @classmethod
    def parse(cls, text: str, **defaults: Any) -> DrafterSpec:
        """``NAME[:key=value,...]``; ``defaults`` fill keys the string does not set (ignored where the drafter has
        no such option, or where the default is ``None``)."""
        name, _, rest = text.partition(":")
        entry = REGISTRY.get(name)
        if entry is None:
            raise ValueError(f"unknown drafter {name!r}; choose one of {drafter_names()}")
        values = {o.name: o.default for o in entry.options}
        for key, value in defaults.items():
            if value is not None and entry.option(key) is not None:
                values[key] = entry.option(key).convert(name, value)
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            option = entry.option(key)
            if not eq or option is None:
                keys = [o.name for o in entry.options]
                raise ValueError(f"bad option {item!r} for drafter {name!r}: "
                                 + (f"its options are {keys}" if keys else "it takes no options"))
            values[key] = option.convert(name, value)
        return cls(name, values)

    def with_options(self, **changes: Any) -> DrafterSpec:
        entry = REGISTRY[self.name]
        return DrafterSpec(self.name, {**self.options, **{k: entry.option(k).convert(self.name, v)
                                                          for k, v in changes.items() if entry.option(k)}})


def build_drafter(spec: DrafterSpec, target: Any) -> Any:
    """The drafter for ``spec`` on top of ``target`` (``None`` for ``none``: autoregressive decoding)."""
    return REGISTRY[spec.name].build(target, **spec.options)


def shipped_weights(name: str) -> Path:
    """Folder of the trained ``name`` (``eagle`` or ``medusa``) heads shipped for SmolLM2-135M-Instruct."""
    return shipped_folder(name, "model.safetensors")


def shipped_folder(name: str, marker: str) -> Path:
    """Folder ``name`` shipped for SmolLM2-135M-Instruct (heads, the retrieval store), which must hold ``marker``."""
    path = Path(str(resources.files("specdec") / "weights" / "smollm2-135m-instruct" / name))
    if not (path / marker).is_file():
        raise ValueError(f"no shipped {name} weights (looked in {path})")
    return path


def resolve_path(name: str, path: str | None) -> str | None:
    """``path=shipped`` -> the shipped folder; a given path must exist."""
    if path == SHIPPED:
        return str(shipped_weights(name))
    if path is not None and not Path(path).expanduser().exists():
        raise ValueError(f"{name}:path={path} does not exist")
    return path
