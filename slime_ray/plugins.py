"""Load a user function or class named on the command line.

slime's extension points (``--custom-rm-path``, ``--custom-generate-function-path``,
``--dynamic-sampling-filter-path``, ...) name a plain function or class. Three spellings
are accepted:

- ``path/to/file.py:name``  the attribute ``name`` of that file;
- ``path/to/file.py``       the first of the caller's ``default_names`` the file defines
                            (e.g. ``reward``, ``custom_rm``, ``CustomRewardModel`` for an RM);
- ``pkg.mod.name``          an importable module attribute (``pkg.mod:name`` works too).

Only the file given is executed: nothing is searched for on ``sys.path`` in the file form,
and ``sys.path`` is not changed. A file's module is loaded once per process (cached by its
absolute path), so classes and module state are shared between calls.

Every error is a :class:`PluginError` (a ``ValueError``) whose message names the flag, the
file or module, and what to change.

Note for Ray: load plug-ins in the process that calls them (pass the spec string to
actors / deployments, not the function object) — a module loaded from a file is not
importable by name in another process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import threading
from types import ModuleType
from typing import Any, Sequence

__all__ = ["PluginError", "load_function", "check_signature", "parse_spec"]


class PluginError(ValueError):
    """A user plug-in could not be loaded or has the wrong shape (message says what to change)."""


_MODULE_CACHE: dict[str, ModuleType] = {}
_LOCK = threading.Lock()


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Split a plug-in spec into ``(kind, location, name)``.

    Returns:
        ``("file", "path/to/file.py", name_or_None)`` or ``("module", "pkg.mod", name)``.
        For a bare dotted path ``pkg.mod.name`` the last component is the name;
        for ``pkg.mod:name`` the part after the colon.
    """
    spec = spec.strip()
    path, sep, name = spec.rpartition(":")
    if not sep or "/" in name or "\\" in name:  # no colon (a Windows drive colon is not a name)
        path, name = spec, ""
    name = name.strip() or None
    path = path.strip()
    if path.endswith(".py") or "/" in path or os.sep in path:
        return "file", path, name
    if name is None:
        mod, dot, attr = path.rpartition(".")
        if not dot:
            return "module", path, None
        return "module", mod, attr
    return "module", path, name


def _public_names(module: ModuleType) -> list[str]:
    """Names of the callables a module defines itself (not ones it imported)."""
    out = []
    for key, val in vars(module).items():
        if key.startswith("_") or not callable(val):
            continue
        if getattr(val, "__module__", None) == module.__name__:
            out.append(key)
    return sorted(out)


def _load_file_module(path: str, *, flag: str) -> ModuleType:
    abspath = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(abspath):
        hint = "" if path.endswith(".py") else " (a file path should end in .py)"
        raise PluginError(
            f"{flag}: file {path!r} does not exist (resolved to {abspath}, working directory "
            f"{os.getcwd()}){hint}. Give the path of an existing Python file, e.g. "
            f"{flag} path/to/file.py:function_name, or an importable dotted path pkg.module.name."
        )
    with _LOCK:
        if abspath in _MODULE_CACHE:
            return _MODULE_CACHE[abspath]
        stem = os.path.splitext(os.path.basename(abspath))[0]
        digest = hashlib.sha1(abspath.encode()).hexdigest()[:10]
        mod_name = f"_slime_ray_plugin_{''.join(c if c.isalnum() else '_' for c in stem)}_{digest}"
        spec = importlib.util.spec_from_file_location(mod_name, abspath)
        if spec is None or spec.loader is None:
            raise PluginError(f"{flag}: cannot load {path!r} as a Python module; give a .py file.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses / typing need the module registered
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:  # noqa: BLE001 - re-raised with the flag named
            sys.modules.pop(mod_name, None)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise PluginError(
                f"{flag}: importing {path!r} failed with {type(exc).__name__}: {exc}. "
                f"Fix the error in that file (note: its directory is not added to sys.path, so "
                f"it can only import installed packages)."
            ) from exc
        _MODULE_CACHE[abspath] = module
        return module


def _load_dotted_module(mod: str, *, flag: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        raise PluginError(
            f"{flag}: cannot import module {mod!r} (from {spec!r}): {exc}. Give an importable "
            f"dotted path pkg.module.name, or a file path/to/file.py:name."
        ) from exc
    except Exception as exc:  # noqa: BLE001
        raise PluginError(
            f"{flag}: importing module {mod!r} failed with {type(exc).__name__}: {exc}."
        ) from exc


def _positional_capacity(sig: inspect.Signature) -> tuple[int, int]:
    """(max positional args accepted (large for *args), number required positionally)."""
    kinds = inspect.Parameter
    cap, required = 0, 0
    for p in sig.parameters.values():
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD):
            cap += 1
            if p.default is inspect.Parameter.empty:
                required += 1
        elif p.kind == kinds.VAR_POSITIONAL:
            cap = 10**6
    return cap, required


def check_signature(obj: Any, expected_params: Sequence[str], *, flag: str, source: str) -> None:
    """Check that ``obj`` can be called with ``len(expected_params)`` positional arguments.

    For a class the constructor is checked. Objects whose signature cannot be read
    (some builtins) pass.

    Raises:
        PluginError: fewer positional parameters than expected, or more required ones.
    """
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    cap, required = _positional_capacity(sig)
    n = len(expected_params)
    what = f"{getattr(obj, '__name__', obj)!s}{sig}"
    want = ", ".join(expected_params)
    if cap < n:
        raise PluginError(
            f"{flag}: {what} in {source} takes {cap} positional parameter(s) but is called as "
            f"({want}). Change its signature to accept ({want})."
        )
    if required > n:
        raise PluginError(
            f"{flag}: {what} in {source} requires {required} positional parameters but is "
            f"called with {n}: ({want}). Give the extra parameters defaults."
        )


def load_function(
    spec: str,
    *,
    flag: str,
    expected_params: list[str] | None = None,
    default_names: Sequence[str] = (),
) -> Any:
    """Load the function or class named by ``spec`` (see the module docstring for the forms).

    Args:
        spec: ``path/to/file.py:name``, ``path/to/file.py`` or ``pkg.mod.name``.
        flag: the command-line flag it came from (``"--custom-rm-path"``), used in errors.
        expected_params: names of the positional arguments it will be called with; when
            given, its signature is checked (the constructor's, for a class).
        default_names: names tried in order when ``spec`` is a file without ``:name``.

    Returns:
        The attribute (a function, class or other callable).

    Raises:
        PluginError: empty spec, missing file or module, import error in the user code,
            missing attribute (the message lists what the file defines), not callable,
            or wrong signature.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"{flag}: empty path; give path/to/file.py:name or pkg.module.name.")
    kind, location, name = parse_spec(spec)
    if kind == "file":
        module = _load_file_module(location, flag=flag)
        source = f"file {location!r}"
    else:
        module = _load_dotted_module(location, flag=flag, spec=spec)
        source = f"module {location!r}"

    defined = _public_names(module)
    if name is None:
        name = next((n for n in default_names if hasattr(module, n)), None)
        if name is None:
            tried = ", ".join(default_names) or "(no default names for this flag)"
            raise PluginError(
                f"{flag}: {source} defines none of the default names [{tried}]; it defines "
                f"{defined or 'no public callables'}. Name one explicitly: "
                f"{flag} {location}:<name>."
            )
    if not hasattr(module, name):
        raise PluginError(
            f"{flag}: {source} has no attribute {name!r}; it defines "
            f"{defined or 'no public callables'}. Fix the name after ':' in {spec!r}."
        )
    obj = getattr(module, name)
    if not callable(obj):
        raise PluginError(
            f"{flag}: {name!r} in {source} is a {type(obj).__name__}, not a function or class. "
            f"Point {flag} at a callable."
        )
    if expected_params is not None:
        check_signature(obj, expected_params, flag=flag, source=source)
    return obj
