"""The documentation CPython ships inside itself: one Document per public function, class and
method of the builtins and of the commonly used standard-library modules.

pydoc's topics (the language reference) say how `for` or `with` work but nothing about
`open()`, `json.dumps` or `pathlib.Path.read_text`, which is what most Python questions are
about. Their docstrings are installed with every Python, so the default corpus needs no
download. Each document is named after what it documents (`pydoc:builtins.open`,
`pydoc:pathlib.Path.read_text`) and starts with that name and its signature, so a hit says
where to look and the signature itself is searchable.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types
import warnings
from collections.abc import Iterator
from typing import Any

from covey.retrieval.documents import Document

logger = logging.getLogger("covey.retrieval")

SOURCE_PREFIX = "pydoc:"
# The modules documented, in this order: an object reachable from several of them (io.open
# is builtins.open) is documented once, under the first. Chosen as what everyday scripts
# and services import; changing this list changes the corpus (see default_corpus).
MODULES = (
    "builtins",
    "os",
    "os.path",
    "io",
    "pathlib",
    "shutil",
    "glob",
    "tempfile",
    "json",
    "csv",
    "pickle",
    "sqlite3",
    "zipfile",
    "re",
    "string",
    "textwrap",
    "collections",
    "collections.abc",
    "itertools",
    "functools",
    "operator",
    "heapq",
    "bisect",
    "copy",
    "dataclasses",
    "enum",
    "typing",
    "contextlib",
    "datetime",
    "time",
    "math",
    "random",
    "statistics",
    "hashlib",
    "base64",
    "uuid",
    "sys",
    "subprocess",
    "threading",
    "concurrent.futures",
    "asyncio",
    "logging",
    "argparse",
    "traceback",
    "pprint",
    "unittest",
    "urllib.parse",
    "urllib.request",
)


def _public_names(module: types.ModuleType) -> list[str]:
    """`__all__` where the module declares its API, else every name without an underscore."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in dir(module) if not n.startswith("_")]
    return sorted(set(names))


def _signature(obj: Any) -> str:
    """`(file, mode='r', ...)`, or "" where CPython records none (then the docstring's first
    line usually spells it, as `int([x]) -> integer` does)."""
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _kind(obj: Any, in_class: bool) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    return "method" if in_class else "function"


def _text(name: str, obj: Any, doc: str, in_class: bool) -> str:
    """The document: its dotted name with signature, what it is, then the docstring."""
    signature = "" if isinstance(obj, property) else _signature(obj)
    kind = "property" if isinstance(obj, property) else _kind(obj, in_class)
    return f"{name}{signature}\nPython {kind} {name}.\n\n{doc}"


def _docstring(obj: Any) -> str | None:
    """The object's own docstring, cleaned; never one inherited from a base class, which
    would repeat the base's text under every subclass."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _class_docstring(cls: type) -> str | None:
    """A class's docstring, else its constructor's (ThreadPoolExecutor documents only
    `__init__`)."""
    return _docstring(cls) or _docstring(vars(cls).get("__init__"))


def _methods(cls: type) -> Iterator[tuple[str, Any, str]]:
    """(name, method, docstring) of the public methods and properties a class defines
    itself or takes from a private base (io.IOBase's methods live in _io._IOBase). Ones
    inherited from public classes are documented there. A method without a docstring of its
    own takes its base's (TextIOWrapper.read explains nothing itself)."""
    private: list[type] = []
    for base in cls.__mro__[1:]:  # up to the first public base, which documents the rest
        if base is object or not base.__name__.startswith("_"):
            break
        private.append(base)
    own: dict[str, Any] = {}
    for base in [*reversed(private), cls]:
        own.update(vars(base))
    for attr, value in sorted(own.items()):
        if attr.startswith("_"):
            continue
        if isinstance(value, classmethod | staticmethod):
            value = value.__func__
        if not (inspect.isroutine(value) or isinstance(value, property)):
            continue
        doc = _docstring(value) or inspect.getdoc(getattr(cls, attr, None))
        if doc:
            yield attr, value, doc


# Where CPython implements a module under another name: its functions say that name.
_IMPLEMENTED_IN = {"posix": "os", "nt": "os", "posixpath": "os.path", "ntpath": "os.path"}


def _home(obj: Any, listed_in: list[str]) -> str:
    """The one module an object is documented under, of those that export it: builtins
    first (open, not io.open), then the one that defines it (datetime.date, not
    sqlite3.Date), else the first listed."""
    if "builtins" in listed_in:
        return "builtins"
    defined = getattr(obj, "__module__", None) or ""
    defined = _IMPLEMENTED_IN.get(defined, defined.lstrip("_"))
    owners = [m for m in listed_in if defined == m or defined.startswith(m + ".")]
    return max(owners, key=len) if owners else listed_in[0]


def _homes(modules: tuple[str, ...]) -> dict[str, list[tuple[str, Any]]]:
    """Module name -> the (name, object) pairs documented under it, in documenting order."""
    listed: dict[int, tuple[Any, list[tuple[str, str]]]] = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a Python built without it (sqlite3 is optional)
            logger.warning("the Python docs corpus leaves out %s: %s", module_name, exc)
            continue
        for name in _public_names(module):
            with warnings.catch_warnings():  # reading a deprecated name is not using it
                warnings.simplefilter("ignore")
                obj = getattr(module, name, None)
            if inspect.isroutine(obj) or inspect.isclass(obj):
                listed.setdefault(id(obj), (obj, []))[1].append((module_name, name))
    homes: dict[str, list[tuple[str, Any]]] = {m: [] for m in modules}
    for obj, places in listed.values():
        home = _home(obj, [m for m, _ in places])
        homes[home].append((dict(places)[home], obj))
    return {m: sorted(pairs, key=_base_classes_first) for m, pairs in homes.items()}


def _base_classes_first(pair: tuple[str, Any]) -> tuple[int, str]:
    """Functions, then classes by depth, by name: a base class is documented before its
    subclasses, so a method they share goes under the base (io.IOBase.readlines)."""
    name, obj = pair
    return (len(obj.__mro__) if inspect.isclass(obj) else 0, name)


def _module_documents(module_name: str, objects: list[tuple[str, Any]]) -> list[Document]:
    """One module's documents. A method whose docstring another class of the module already
    gave for the same name (io's many `read`s) is left out: identical texts under several
    names only crowd each other out of the results."""
    docs: list[Document] = []
    method_docs: set[tuple[str, str]] = set()
    for name, obj in objects:
        qualified = f"{module_name}.{name}"
        is_class = inspect.isclass(obj)
        doc = _class_docstring(obj) if is_class else _docstring(obj)
        if doc:
            docs.append(Document(_text(qualified, obj, doc, False), SOURCE_PREFIX + qualified))
        if not is_class:
            continue
        for attr, method, method_doc in _methods(obj):
            if (attr, method_doc) in method_docs:
                continue
            method_docs.add((attr, method_doc))
            method_name = f"{qualified}.{attr}"
            text = _text(method_name, method, method_doc, True)
            docs.append(Document(text, SOURCE_PREFIX + method_name))
    return docs


def stdlib_documents(modules: tuple[str, ...] = MODULES) -> list[Document]:
    """Every module's documents, modules in the given order, each object under one name."""
    homes = _homes(modules)
    return [doc for name in modules for doc in _module_documents(name, homes[name])]
