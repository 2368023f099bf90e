"""Find an app object by reference: ``"module:attribute"`` (as Flower's ``flower-server-app``).

Used by ``stamen server`` and ``stamen node`` to load a ServerApp or ClientApp written for
Flower 1.12 (``import stamen as fl``) from a module importable from the current directory.
Also parses Flower's ``key=value`` config strings (``--node-config``, ``--run-config``).
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import TypeVar

from .errors import ConfigError
from .typing import UserConfig, UserConfigValue

__all__ = ["load_app", "parse_config"]

_T = TypeVar("_T")

_REFERENCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def _apps_in(module: object, expected: type) -> list[str]:
    return sorted(name for name, value in vars(module).items() if isinstance(value, expected))


def load_app(reference: str, expected: type[_T], search_path: str | Path = ".") -> _T:
    """Import ``module`` and return its ``attribute`` (``"module:attribute"``), checking
    that it is an instance of ``expected``.

    ``search_path`` (default: the current directory) is put first on ``sys.path``, so a
    module next to where the command runs is found, as with Flower's commands.

    Raises:
        ConfigError: ``reference`` is not ``module:attribute``, the module cannot be
            imported (or raised while importing), the attribute is missing, or it is not
            an ``expected``. The message says what was found.
    """
    kind = expected.__name__
    if not isinstance(reference, str) or not _REFERENCE.match(reference):
        raise ConfigError(
            f"app: expected 'module:attribute' naming a {kind} (e.g. 'app:{kind.lower()}'), "
            f"received {reference!r}"
        )
    module_name, _, attribute = reference.partition(":")
    where = str(Path(search_path).resolve())
    if where not in sys.path:
        sys.path.insert(0, where)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise ConfigError(
                f"app: expected a module {module_name!r} importable from {where}, found none "
                f"(no module named {exc.name!r})"
            ) from exc
        raise ConfigError(f"app: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:  # the user's module raised while loading
        raise ConfigError(
            f"app: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    value: object = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            found = _apps_in(module, expected)
            hint = f"; it has {kind}(s): {found}" if found else f"; it has no {kind}"
            raise ConfigError(
                f"app: expected attribute {attribute!r} in module {module_name!r}, found none{hint}"
            )
        value = getattr(value, part)
    if not isinstance(value, expected):
        found = _apps_in(module, expected)
        hint = f" (its {kind}(s): {found})" if found else ""
        raise ConfigError(
            f"app: expected {reference!r} to be a {kind}, found a {type(value).__name__}{hint}"
        )
    return value


_PAIR = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def _value(text: str) -> UserConfigValue:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def parse_config(text: str | None) -> UserConfig:
    """Parse ``'key1="a" key2=1 key3=0.5 key4=true'`` (Flower's ``--node-config`` form).

    Quoted values are strings; ``true``/``false`` are bools; numbers are ints or floats; an
    unquoted word that is none of these is a string.

    Raises:
        ConfigError: a word is not ``key=value``.
    """
    config: UserConfig = {}
    if not text:
        return config
    consumed = _PAIR.sub("", text).strip()
    if consumed:
        raise ConfigError(
            f"config: expected space-separated key=value pairs, received {text!r} "
            f"(not understood: {consumed!r})"
        )
    for key, value in _PAIR.findall(text):
        config[key] = _value(value)
    return config
