"""Method registry: ``@register_method("lora")`` on a :class:`PeftMethod` subclass."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._base import MethodConfig, PeftMethod

_METHODS: dict[str, type[PeftMethod]] = {}

# Listing order (the command-line names of docs/cli.md); methods not named here follow, by name.
CANONICAL_ORDER = ("linear", "full", "bitfit", "vpt-shallow", "vpt-deep", "lora", "adaptformer",
                   "ssf", "spt-lora", "spt-adapter", "sct", "dyt", "e2vpt", "bi-adaptformer",
                   "bi-lora", "velora", "hst", "pvp")


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_method(name: str):
    """Class decorator that files a method under its command-line name."""

    def wrap(cls: type[PeftMethod]) -> type[PeftMethod]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        for other in _METHODS.values():
            if other.Config is cls.Config:
                raise ValueError(f"{name} reuses {other.name}'s config class "
                                 f"{cls.Config.__name__}; give it its own subclass")
        cls.name = name
        cls.Config.prefix = name
        _METHODS[name] = cls
        return cls

    return wrap


def method_names() -> list[str]:
    rank = {n: i for i, n in enumerate(CANONICAL_ORDER)}
    return sorted(_METHODS, key=lambda n: (rank.get(n, len(rank)), n))


def get_method_class(name: str) -> type[PeftMethod]:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; available: {', '.join(method_names())}"
        ) from None


def create_method(name: str, config: MethodConfig | dict[str, Any] | None = None) -> PeftMethod:
    """Instantiate a method from its name and a config object or plain dict of values."""
    cls = get_method_class(name)
    if config is None or isinstance(config, dict):
        config = cls.Config.from_dict(config)
    elif not isinstance(config, cls.Config):
        raise TypeError(f"{name} expects a {cls.Config.__name__}, got {type(config).__name__}")
    return cls(config)


def view_pages() -> dict[str, str]:
    """Method name → the page (file under ``pages/``) that shows its own view, in listing
    order; methods without a view are left out."""
    return {n: _METHODS[n].view_page for n in method_names() if _METHODS[n].view_page}


def methods_with_view(page: str) -> tuple[str, ...]:
    """The methods a view page shows (``page`` is its file name, e.g. ``"4_SPT.py"``)."""
    return tuple(n for n, file in view_pages().items() if file == page)
