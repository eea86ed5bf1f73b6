"""A retrieval evaluation of the default Python-docs corpus: questions a new user asks, each
with the documents that answer it, and hit@k (the share of questions with at least one of
those documents among the first k results).

The questions are phrased the way people ask, not with the docstrings' words ("how do I
open a file", not "Open file and return a stream"), and each names every document that
answers it (`os.listdir`, `os.scandir` and `pathlib.Path.iterdir` all list a directory).
The test suite and benchmarks/retrieval.py both run it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from covey.retrieval.documents import Document
from covey.retrieval.searcher import Searcher

# (question, the sources any of which answers it); sources without the "pydoc:" prefix.
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("how do I open a file", ("builtins.open",)),
    (
        "read a whole text file into a string",
        ("pathlib.Path.read_text", "io.IOBase.readlines", "builtins.open"),
    ),
    ("convert a Python object to a JSON string", ("json.dumps", "json.dump")),
    ("parse JSON text into a dictionary", ("json.loads", "json.load")),
    (
        "list the files in a directory",
        ("os.listdir", "os.scandir", "pathlib.Path.iterdir", "glob.glob"),
    ),
    (
        "check whether a file exists",
        ("os.path.exists", "os.path.isfile", "pathlib.Path.exists", "pathlib.Path.is_file"),
    ),
    ("join two parts of a file path", ("os.path.join", "pathlib.PurePath.joinpath")),
    ("create a directory including missing parents", ("os.makedirs", "pathlib.Path.mkdir")),
    ("delete a directory and everything in it", ("shutil.rmtree",)),
    ("copy a file to another place", ("shutil.copy", "shutil.copyfile", "shutil.copy2")),
    (
        "find files whose names match a wildcard pattern",
        ("glob.glob", "glob.iglob", "pathlib.Path.glob", "pathlib.Path.rglob"),
    ),
    (
        "run a shell command and capture its output",
        ("subprocess.run", "subprocess.check_output", "subprocess.getoutput"),
    ),
    ("read an environment variable", ("os.getenv", "os.getenvb")),
    ("replace the parts of a string that match a regular expression", ("re.sub", "re.subn")),
    ("find every match of a regex in a string", ("re.findall", "re.finditer")),
    ("split a string on a separator", ("builtins.str.split", "builtins.str.rsplit", "re.split")),
    (
        "remove whitespace from both ends of a string",
        ("builtins.str.strip", "builtins.str.lstrip", "builtins.str.rstrip"),
    ),
    ("count how many times each item occurs", ("collections.Counter",)),
    (
        "dictionary that gives a default value for missing keys",
        ("collections.defaultdict", "builtins.dict.get", "builtins.dict.setdefault"),
    ),
    (
        "sort a list of records by one of their fields",
        ("builtins.sorted", "builtins.list.sort", "operator.itemgetter", "operator.attrgetter"),
    ),
    ("remember the results of a function call", ("functools.lru_cache", "functools.cache")),
    (
        "all combinations of items from a list",
        ("itertools.combinations", "itertools.permutations", "itertools.product"),
    ),
    ("chain several iterables together into one", ("itertools.chain",)),
    (
        "get the current date and time",
        ("datetime.datetime.now", "datetime.date.today", "time.time", "time.localtime"),
    ),
    (
        "parse a date from a string with a format",
        ("datetime.datetime.strptime", "time.strptime", "datetime.date.fromisoformat"),
    ),
    ("pause the program for a few seconds", ("time.sleep", "asyncio.sleep")),
    ("pick a random element from a list", ("random.choice", "random.choices", "random.sample")),
    ("square root of a number", ("math.sqrt", "math.isqrt")),
    ("read the rows of a CSV file", ("csv.reader",)),
    ("parse command-line arguments", ("argparse.ArgumentParser",)),
    (
        "send log messages to a file",
        ("logging.basicConfig", "logging.FileHandler"),
    ),
    (
        "run several coroutines concurrently and wait for all of them",
        ("asyncio.gather", "asyncio.wait", "asyncio.create_task"),
    ),
    (
        "run a function in a pool of threads",
        (
            "concurrent.futures.ThreadPoolExecutor",
            "concurrent.futures.Executor.submit",
            "concurrent.futures.Executor.map",
            "asyncio.to_thread",
        ),
    ),
    (
        "create a temporary file",
        ("tempfile.NamedTemporaryFile", "tempfile.TemporaryFile", "tempfile.mkstemp"),
    ),
    ("compute the SHA-256 hash of some bytes", ("hashlib.sha256", "hashlib.new")),
    ("make a deep copy of an object", ("copy.deepcopy",)),
    ("a class that just holds some data fields", ("dataclasses.dataclass",)),
    ("loop over a list with the index of each item", ("builtins.enumerate",)),
    ("iterate over two lists in parallel", ("builtins.zip",)),
    ("catch an exception and handle it", ("try", "exceptions")),
    ("serialize an object to bytes and load it back", ("pickle.dumps", "pickle.loads")),
    ("average and median of a list of numbers", ("statistics.mean", "statistics.median")),
    ("encode bytes as base64 text", ("base64.b64encode", "base64.standard_b64encode")),
    ("generate a random unique identifier", ("uuid.uuid4", "uuid.uuid1")),
    (
        "print the traceback of an exception",
        ("traceback.print_exc", "traceback.format_exc", "traceback.print_exception"),
    ),
    ("split a URL into its parts", ("urllib.parse.urlparse", "urllib.parse.urlsplit")),
    ("exit the program with a status code", ("sys.exit",)),
    ("convert a string to an integer", ("builtins.int",)),
)


@dataclass(frozen=True)
class QuestionResult:
    """One question: the sources of its first k results and the rank (1-based) of the first
    one that answers it, None when none does."""

    question: str
    expected: tuple[str, ...]
    found: tuple[str, ...]
    rank: int | None


def expected_sources(prefix: str = "pydoc:") -> set[str]:
    """Every source some question expects, with the corpus's prefix."""
    return {prefix + s for _, sources in QUESTIONS for s in sources}


def evaluate(
    index: Searcher,
    k: int = 3,
    mode: str | None = None,
    questions: Sequence[tuple[str, Sequence[str]]] = QUESTIONS,
    prefix: str = "pydoc:",
) -> list[QuestionResult]:
    """Search each question (k results, `mode` or the index's default)."""
    results = []
    for question, sources in questions:
        wanted = {prefix + s for s in sources}
        found = tuple(hit.chunk.source for hit in index.search(question, k=k, mode=mode))
        rank = next((i for i, s in enumerate(found, start=1) if s in wanted), None)
        results.append(QuestionResult(question, tuple(sources), found, rank))
    return results


def hit_rate(results: Sequence[QuestionResult]) -> float:
    """hit@k: the share of questions answered within the k results they were run with."""
    return sum(r.rank is not None for r in results) / len(results) if results else 0.0


def evaluation_subset(distractors: int = 300, seed: int = 13) -> list[Document]:
    """Every default-corpus document some question expects, then `distractors` others drawn
    with a fixed seed: an index small enough to embed in seconds (tests, quick benchmarks).
    Its hit@k is higher than the whole corpus's, which has more near misses."""
    from covey.retrieval.default_corpus import default_documents

    wanted = expected_sources()
    docs = default_documents()
    answers = [d for d in docs if d.source in wanted]
    others = [d for d in docs if d.source not in wanted]
    return answers + random.Random(seed).sample(others, min(distractors, len(others)))
