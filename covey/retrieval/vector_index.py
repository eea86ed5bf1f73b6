"""faiss vector indexes: exact inner product by default, IVF or HNSW when large or asked.

The normalized vectors themselves are the source of truth (kept beside the index), so an
approximate index can always be rebuilt, and its recall is measured against exact search
whenever it is built rather than assumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from covey.errors import ConfigError, RetrievalError

KINDS = ("auto", "flat", "ivf", "hnsw")
# Below this many queries faiss scans without BLAS; one OpenMP thread is then faster, and
# far steadier on a busy machine (a descheduled worker stalls the barrier for a whole tick).
SMALL_BATCH = 20


@dataclass(frozen=True)
class IndexConfig:
    """`kind="auto"` is exact below `auto_threshold` vectors and HNSW above it.

    `nlist=None` picks about 4*sqrt(n) IVF lists; `nprobe` lists are scanned per query.
    """

    kind: str = "auto"
    auto_threshold: int = 50_000
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    use_gpu: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("auto_threshold", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist <= 0:
            raise ConfigError(f"nlist must be > 0 or None, got {self.nlist}")

    def resolve_kind(self, n: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "hnsw" if n >= self.auto_threshold else "flat"


def load_faiss():
    """The faiss module; which build (CPU or GPU) is the installer's choice of extra."""
    try:
        import faiss
    except ImportError as exc:
        raise RetrievalError(
            "faiss is not installed: pip install 'covey[cpu]' (faiss-cpu) or, with CUDA, "
            "'covey[gpu]' (faiss-gpu-cu12)"
        ) from exc
    return faiss


def gpu_available() -> bool:
    """True when the GPU build of faiss is installed and sees a CUDA device."""
    faiss = load_faiss()

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _ivf_nlist(config: IndexConfig, n: int) -> int:
    # faiss wants ~39 training points per centroid; small data gets fewer lists.
    nlist = config.nlist or max(1, int(4 * math.sqrt(n)))
    return max(1, min(nlist, n // 39 or 1))


def build_index(vectors: np.ndarray, kind: str, config: IndexConfig):
    """A faiss index over `vectors` ([n, d] float32, unit norm); ids are row positions."""
    faiss = load_faiss()

    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.hnsw.efSearch = config.ef_search
    elif kind == "ivf":
        nlist = _ivf_nlist(config, n)
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(config.nprobe, nlist)
    else:
        raise ConfigError(f"kind must be one of flat, ivf, hnsw; got {kind!r}")
    index = to_gpu(index, config)
    if n:
        index.add(vectors)
    return index


def to_gpu(index, config: IndexConfig):
    """Move flat and IVF indexes to the GPU when possible; faiss has no GPU HNSW."""
    faiss = load_faiss()

    if not (config.use_gpu and gpu_available()) or isinstance(index, faiss.IndexHNSWFlat):
        return index
    if not hasattr(to_gpu, "resources"):
        to_gpu.resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(to_gpu.resources, 0, index)


def to_cpu(index):
    """A CPU copy for writing to disk (faiss cannot serialize GPU indexes)."""
    faiss = load_faiss()

    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


def search_index(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each [len(queries), k']; k' = min(k, ntotal); no -1 padding returned."""
    k = min(k, index.ntotal)
    if k == 0:
        empty = np.zeros((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(queries) >= SMALL_BATCH:
        return index.search(queries, k)
    with _one_thread():
        return index.search(queries, k)


@contextmanager
def _one_thread() -> Iterator[None]:
    faiss = load_faiss()

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row ids by inner product, [len(queries), k]; the recall ground truth."""
    sims = queries @ vectors.T  # [q, n]
    k = min(k, vectors.shape[0])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k ids that the approximate search returned."""
    hits = sum(len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth, strict=True))
    return hits / max(1, truth.size)


def measure_recall(index, vectors: np.ndarray, k: int = 10, queries: int = 200) -> float:
    """recall@k of `index` against exact search, querying with a sample of its own vectors
    slightly perturbed (real queries are near, not on, indexed points)."""
    n = vectors.shape[0]
    if n == 0:
        return 1.0
    rng = np.random.default_rng(0)
    rows = rng.choice(n, size=min(queries, n), replace=False)
    q = vectors[rows] + rng.normal(0, 0.02, size=(len(rows), vectors.shape[1]))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    truth = exact_search(vectors, q, k)
    _, found = search_index(index, q, k)
    return recall_at_k(found, truth)
