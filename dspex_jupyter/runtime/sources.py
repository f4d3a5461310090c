"""Source of notebook-defined classes, so ``inspect.getsource`` works in a pool kernel too.

DSPy's program-aware proposer (``dspy.propose.utils.get_dspy_source_code``) puts the
program's source into its prompts; ``inspect.getsource(cls)`` finds it. For a class
defined in a notebook cell, ``__module__`` is ``__main__``, which has no file, so
``inspect`` (patched by DSPy: ``dspy.teleprompt.utils.new_getfile``) takes the file of the
class's methods, ``co_filename``: the cell's name (``/tmp/ipykernel_<pid>/<hash>.py``, or
``<ipython-input-3-...>`` in a terminal IPython). No such file exists; IPython keeps each
cell's lines in ``linecache`` under that name, in the notebook's process only.

In the kernel two things are missing. cloudpickle rebuilds the class with every method's
``co_filename`` set to ``"<dynamic-code>"`` (to make its payloads deterministic), and the
kernel's ``linecache`` has no cell lines. ``inspect`` then fails ("could not get source
code"), the proposer runs without the program ("Error getting source code") and proposes
other instructions than the same run in the notebook.

So the notebook sends, with the run, the lines of the cells its program's classes were
defined in and which cell each method came from (``class_sources``); the kernel registers
the lines in its ``linecache`` as IPython does (an entry whose mtime is None, which
``linecache.checkcache`` keeps) and gives the methods their cell's name back
(``attach_sources``). Remote tracebacks then show the cell's lines too. Only text held in
memory travels (cells, or ``exec``'d text registered the same way), never a file from
disk, and a name that is a real file in the kernel is not shadowed. The text is data for
``inspect``: nothing here compiles or runs it.

Standard library only: both sides import it.
"""

from __future__ import annotations

import linecache
import os
import sys
from collections.abc import Iterable
from types import CodeType
from typing import Any

# What cloudpickle writes into the code objects it ships (cloudpickle.cloudpickle._code_reduce).
PICKLED_FILENAME = "<dynamic-code>"


def defined_in_memory(cls: type) -> bool:
    """True for a class cloudpickle ships by value: defined in ``__main__`` (a notebook),
    or in a module that cannot give it back by import."""
    module_name = getattr(cls, "__module__", None) or ""
    if module_name == "__main__":
        return True
    obj: Any = sys.modules.get(module_name)
    if obj is None:
        return True
    for part in cls.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is not cls


def program_parts(program: Any) -> list[Any]:
    """What DSPy reads the source of: the program, its sub-modules and their signatures
    (duck-typed on ``dspy.Module``'s methods: no DSPy import here)."""
    parts = [program]
    if callable(getattr(program, "named_sub_modules", None)):
        parts += [module for _, module in program.named_sub_modules()]
    if callable(getattr(program, "predictors", None)):
        parts += [getattr(p, "signature", None) for p in program.predictors()]
    return [part for part in parts if part is not None]


def _class_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _functions(cls: type) -> dict[str, Any]:
    """The functions defined in the class body, by attribute name."""
    found = {}
    for name, member in vars(cls).items():
        if isinstance(member, staticmethod | classmethod):
            member = member.__func__
        elif isinstance(member, property):
            member = member.fget
        if isinstance(getattr(member, "__code__", None), CodeType):
            found[name] = member
    return found


def _classes(objects: Iterable[Any]) -> list[type]:
    """The in-memory classes of ``objects`` (instances or classes) and of their bases."""
    seen: dict[type, None] = {}
    for obj in objects:
        cls = obj if isinstance(obj, type) else type(obj)
        for klass in getattr(cls, "__mro__", (cls,)):
            if klass not in seen and defined_in_memory(klass):
                seen[klass] = None
    return list(seen)


def _in_memory_lines(filename: str) -> list[str] | None:
    """The lines ``linecache`` holds for a name that is no file (an IPython cell)."""
    entry = linecache.cache.get(filename)
    if entry is None or len(entry) != 4 or entry[1] is not None:
        return None  # not cached, lazily loadable, or read from a file (mtime set)
    return list(entry[2])


def class_sources(objects: Iterable[Any]) -> dict[str, Any]:
    """For the in-memory classes of ``objects``: ``{"files": {name: text}, "classes":
    {"module:qualname": {method: name}}}``, the cells they were defined in (JSON)."""
    files: dict[str, str] = {}
    classes: dict[str, dict[str, str]] = {}
    for cls in _classes(objects):
        methods = {}
        for name, func in _functions(cls).items():
            filename = func.__code__.co_filename
            if filename not in files:
                lines = _in_memory_lines(filename)
                if lines is None:
                    continue  # a file on disk, or no source at all
                files[filename] = "".join(lines)
            methods[name] = filename
        if methods:
            classes[_class_key(cls)] = methods
    return {"files": files, "classes": classes} if files else {}


def register_sources(files: dict[str, str]) -> list[str]:
    """Put ``files`` into this process's ``linecache`` the way IPython registers a cell;
    the names registered (a name that is a real file here is left alone)."""
    registered = []
    for filename, text in files.items():
        if not (isinstance(filename, str) and filename and isinstance(text, str)):
            continue
        if os.path.exists(filename):
            continue  # the real file wins (e.g. a cell the debugger wrote out)
        linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
        registered.append(filename)
    return registered


def _renamed(code: CodeType, filename: str) -> CodeType:
    """``code`` and the code nested in it (lambdas, inner functions), under ``filename``."""
    consts = tuple(
        _renamed(c, filename)
        if isinstance(c, CodeType) and c.co_filename == PICKLED_FILENAME
        else c
        for c in code.co_consts
    )
    return code.replace(co_filename=filename, co_consts=consts)


def attach_sources(program: Any, sources: dict[str, Any] | None) -> Any:
    """Register the cells ``sources`` carries and give the methods of the program's
    in-memory classes their cell's name back; returns ``program``."""
    if not sources:
        return program
    register_sources(sources.get("files") or {})
    wanted = sources.get("classes") or {}
    for cls in _classes(program_parts(program)):
        methods = wanted.get(_class_key(cls)) or {}
        for name, func in _functions(cls).items():
            filename = methods.get(name)
            if filename and func.__code__.co_filename == PICKLED_FILENAME:
                func.__code__ = _renamed(func.__code__, filename)
    return program
