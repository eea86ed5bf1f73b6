"""Decode steps through torch.compile (inductor): one compiled graph for the whole step.

A decode step of a small model is mostly dispatch: each layer runs ~45 small ATen ops
(RMSNorm, RoPE, SwiGLU, residual adds, the attention's views and matmuls) around its four
weight matmuls, one token per sequence, so at batch 1 the step is dominated by the cost of
calling ops, not by their work. Compiled as one graph, the elementwise work of a layer
becomes a few generated C++ loops, and with inductor's `cpp_wrapper` the code that calls
the kernels is C++ too: the CPU analogue of replaying a CUDA graph.

Why one graph for all 30 layers: compiling each layer's halves separately (the first
version of this file) cost two compiled calls per layer (guards and a Python wrapper each),
which ate what the fusion saved, and it measured no faster than eager with int4 weights.

Paged attention stays eager, inside the graph as an opaque custom op
(`covey::decode_attention`, decode_attention_op.py), which reads the KV pool and the step's
attention metadata from a per-thread step context that `CompiledDecode` sets around each
step. Nothing else in the graph touches the pool, and the layers' data dependencies order
the op's writes and reads.

Per step, around the graph: dynamo's guards on ~300 module attributes and tensors were
~4000 checks, and its argument list the same paths again. Each `CompiledDecode` compiles
its own copy of the step function, so its graphs only ever serve its own model; the guards
on that model are dropped (`_drop_model_guards`), and once dynamo has checked a batch size
the graph it chose is called directly (`_DirectGraph`).

The batch size is a dynamic dimension up to KERNEL_MAX_ROWS (batch 1 gets its own graph,
as torch specializes it); wider decode steps run eagerly. KERNEL_MAX_ROWS is where int8
layers switch to their dequantizing path (int4 layers switch later, at
INT4_KERNEL_MAX_ROWS): the smaller bound serves every mode, so no step inside it meets a
layer that changes branch, which would trace the graph again mid-serving.

Compiling costs about a minute the first time (more on a loaded machine). Inductor's caches
live under `covey_home()/inductor`, so later runs load the generated code instead, but still
trace the model (seconds); `warm_up` does both at engine start, with progress, rather than
inside the first request. Prefill and mixed steps stay eager: they are matmul-bound.

It is the default on CPU (`EngineConfig.compile=None`, see `engine_decode_step`) for
single-stream decode: in the full-size benchmark (results/engine.json) 9.0 ms a token against
eager's 9.9 and llama.cpp's 7.6, though eager served 32 concurrent requests faster (352
against 327 tok/s; docs/performance.md). Under that default a
machine where compiling fails (no C++ compiler, a torch bug) gets a warning and the eager
step, never an engine that does not start.
"""

from __future__ import annotations

import logging
import os
import time
import types
import weakref
from collections.abc import Callable

import torch

from covey.errors import ConfigError, EngineError, NotSupportedError
from covey.home import covey_home
from covey.llm_backend.attention_metadata import AttentionMetadata, DecodeGroup
from covey.llm_backend.decode_attention_op import StepAttention, step_context
from covey.llm_backend.layers import apply_rotary
from covey.llm_backend.model import DecoderLayer, LlamaModel
from covey.llm_backend.quantization import KERNEL_MAX_ROWS

log = logging.getLogger(__name__)

# Inductor options for the step graph. cpp_wrapper: kernels called from generated C++, not
# from a generated Python function. The size and alignment asserts are Python calls after
# every extern kernel; the graph's shapes are checked once, by its guards.
INDUCTOR_OPTIONS = {"cpp_wrapper": True, "size_asserts": False, "alignment_asserts": False}

# The oldest torch whose `torch.compile` takes `options={"guard_filter_fn": ...}` (older ones
# hand the option to the backend) and has `torch.compiler.set_stance`.
MIN_TORCH = (2, 8)

# Set to "0" (or "false", "no", "off"), the default (`EngineConfig.compile=None`) runs the
# decode step eagerly: for processes that start many short-lived engines (the test suite)
# or want a fast start. "1", "true", "yes", "on" or unset keep the default; anything else
# is an error, so a misspelt "off" never compiles silently.
COMPILE_ENV = "COVEY_COMPILE"
ENV_OFF = ("0", "false", "no", "off")
ENV_ON = ("1", "true", "yes", "on", "")


def _trace_config():
    """Dynamo's options for tracing the step. specialize_float: the model's Python floats
    (the RMSNorms' eps) are constants of the graph. With dynamic=True dynamo first makes
    them symbolic inputs, then finds they must be specialized and restarts, tracing the
    whole model a second time: most of a warm start's batch-1 graph."""
    return torch._dynamo.config.patch(specialize_float=True)


def compile_by_default(device: torch.device) -> bool:
    """What `EngineConfig.compile=None` means: compile on CPU, with a torch that can, unless
    COVEY_COMPILE=0. On CUDA the step stays eager: this graph (inductor's C++ wrapper, the
    CPU analogue of a CUDA graph) was built and measured for CPU; on a GPU the tool would
    be CUDA graphs, which covey does not build."""
    return not compile_env_off() and device.type == "cpu" and torch_supports_compile()


def compile_env_off() -> bool:
    """Whether COVEY_COMPILE turns the default off; ConfigError for a value it cannot read
    (checked on every machine, so a typo shows where it is written, not only on CPU). The
    engine asks before it loads the model, so a typo costs no load."""
    value = os.environ.get(COMPILE_ENV, "").strip().lower()
    if value not in ENV_OFF + ENV_ON:
        raise ConfigError(
            f"{COMPILE_ENV} must be one of {', '.join(ENV_OFF)} (run eagerly) or "
            f"{', '.join(ENV_ON[:-1])} (compile by default), got {os.environ[COMPILE_ENV]!r}"
        )
    return value in ENV_OFF


def engine_decode_step(
    model: LlamaModel, setting: bool | None, device: torch.device
) -> CompiledDecode | None:
    """The engine's compiled decode step for `EngineConfig.compile=setting`, warmed up, or
    None for the eager step. Asked for (True), a failure to compile raises. By default
    (None) it is a warning and the eager step: the default must not stop an engine from
    starting on a machine that cannot compile."""
    if setting is False or (setting is None and not compile_by_default(device)):
        return None
    try:
        compiled = CompiledDecode(model)
        compiled.warm_up()
        return compiled
    except Exception as exc:
        if setting:
            if isinstance(exc, NotSupportedError):
                raise
            raise EngineError(
                "EngineConfig.compile=True, but torch.compile failed on this machine: "
                f"{_first_line(exc)} (compile=False runs the same model eagerly)"
            ) from exc
        log.warning(
            "covey: compiling the decode step failed, so it runs eagerly (slower): %s. "
            "EngineConfig(compile=False), --no-compile or %s=0 skip the attempt.",
            _first_line(exc),
            COMPILE_ENV,
        )
        return None


def _first_line(exc: BaseException) -> str:
    """The error's type and first line: inductor's errors run to pages of compiler output."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled code: the user's TORCHINDUCTOR_CACHE_DIR, else under
    covey's home. (torch writes its own default into the variable once inductor has run,
    so that value counts as unset.) Read before importing torch's module: its first import
    turns an empty variable into the working directory, and an empty one means unset."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "").strip()
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen
    return str(covey_home() / "inductor")


def _pre_attention(
    layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, hidden] -> q [T, H, Dh], k and v [KVH, T, Dh] (RoPE applied to q and k): keys
    and values in the pool's head-major order, so that storing them is one copy each."""
    attn = layer.self_attn
    t = x.shape[0]
    qkv = attn.qkv_proj(layer.input_layernorm(x))
    qk = qkv[:, : attn.q_size + attn.kv_size].view(t, attn.num_heads + attn.num_kv_heads, -1)
    qk = apply_rotary(qk, cos, sin)
    q, k = qk.split([attn.num_heads, attn.num_kv_heads], dim=1)
    v = qkv[:, attn.q_size + attn.kv_size :].view(t, attn.num_kv_heads, attn.head_dim)
    return q.contiguous(), k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()


def _post_attention(layer: DecoderLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Residual stream after attention output [T, H, Dh] and the MLP -> x [T, hidden]."""
    x = x + layer.self_attn.o_proj(out.reshape(x.shape[0], -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _decode_step(model: LlamaModel, input_ids: torch.Tensor, positions: torch.Tensor):
    """`LlamaModel.forward` for a pure decode step, written for one graph."""
    x = model.embed_tokens(input_ids)
    cos, sin = model.rotary(positions, x.dtype)
    for i, layer in enumerate(model.layers):
        q, k, v = _pre_attention(layer, x, cos, sin)
        x = _post_attention(layer, x, torch.ops.covey.decode_attention(q, k, v, i))
    return model.norm(x)


def _own_copy(fn: Callable) -> Callable:
    """`fn` with a code object of its own. Dynamo keeps compiled graphs, and checks their
    guards, per code object: with one copy per `CompiledDecode`, the graphs of one model are
    never tried for another model's step, and `_drop_model_guards` is safe."""
    code = fn.__code__.replace()  # a new code object, equal to the old
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _drop_model_guards(entries) -> list[bool]:
    """Dynamo guards for the step graph, less those on the model's attributes.

    Dynamo guards every module, parameter, buffer and constant the step reads: ~4000 checks
    for the 30 layers, each call (~0.3-0.8 ms of a ~10 ms step). They protect a graph from
    a different model, and from a model changed after tracing. A `CompiledDecode` compiles
    for one model object (its own code object, `_own_copy`), which the engine never changes
    (weights are loaded and quantized before it is made; a reloaded model is a new engine),
    and its graph takes the parameters and buffers as inputs, so new values in place are
    read. What stays: the guards on the token ids and positions (dtype, shape: the batch-1
    graph against the dynamic one), torch's global state (its thread count among them) and
    the Python globals the step calls."""
    return [not (e.name == "model" or e.name.startswith("model.")) for e in entries]


class _DirectGraph:
    """A compiled step graph called without dynamo.

    Dynamo calls a graph with its inputs in a list it builds on each call from the step's
    arguments: the model's ~300 parameters and buffers by attribute paths (about 0.4 ms of
    a step), then the token ids, the positions and their sizes. Here the model's tensors
    are looked up once (the model is fixed, see `_drop_model_guards`; new values in place
    are read) and only the step's own inputs are filled in. A graph with an input of any
    other kind keeps going through dynamo (`callable` False)."""

    STEP_INPUTS: dict[str, Callable] = {
        "L['input_ids']": lambda ids, pos: ids,
        "L['positions']": lambda ids, pos: pos,
        "L['input_ids'].size()[0]": lambda ids, pos: ids.shape[0],
        "L['positions'].size()[0]": lambda ids, pos: pos.shape[0],
    }

    def __init__(self, args: list, per_step: list, compiled: Callable, callable_: bool):
        self.args, self.per_step, self.compiled, self.callable = args, per_step, compiled, callable_

    @classmethod
    def of(
        cls, model: LlamaModel, gm: torch.fx.GraphModule, example_inputs: list, compiled: Callable
    ) -> _DirectGraph:
        """The graph `gm` compiled as `compiled`, its inputs looked up from the sources
        dynamo recorded for them. This reads dynamo internals (graph arguments' sources,
        placeholder order = argument order): each looked-up tensor must be the very one
        dynamo passed at compile time (`example_inputs`) and the graph must return one
        tensor, else, or on any error, dynamo keeps calling the graph (with a warning)."""
        try:
            return cls._of(model, gm, example_inputs, compiled)
        except Exception as exc:
            log.warning("compiled decode: calling the graph directly failed (%s): dynamo calls"
                        " it, with its per-step guards", exc)
            return cls([], [], compiled, False)

    @classmethod
    def _of(
        cls, model: LlamaModel, gm: torch.fx.GraphModule, example_inputs: list, compiled: Callable
    ) -> _DirectGraph:
        sources = [n.meta["grapharg"].source for n in gm.graph.find_nodes(op="placeholder")]
        if len(sources) != len(example_inputs):
            raise ValueError(f"{len(sources)} sources for {len(example_inputs)} graph inputs")
        (output,) = gm.graph.find_nodes(op="output")
        if len(output.args[0]) != 1:
            raise ValueError(f"the step graph returns {len(output.args[0])} values, not one")
        args: list = []
        per_step = []
        found: dict = {}
        for i, (source, example) in enumerate(zip(sources, example_inputs, strict=True)):
            name = source.name if isinstance(source.name, str) else source.name()
            if name.startswith("L['model']"):  # e.g. L['model']._modules['norm']...
                value = source.get_value({}, {"L": {"model": model}}, found)
                if isinstance(value, torch.Tensor) and value is not example:
                    raise ValueError(f"{name} is not the tensor dynamo passed")
                args.append(value)
            elif name in cls.STEP_INPUTS:
                args.append(None)
                per_step.append((i, cls.STEP_INPUTS[name]))
            else:  # an input of another kind: dynamo keeps calling this graph, silently
                return cls([], [], compiled, False)
        return cls(args, per_step, compiled, True)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """For callers other than `CompiledDecode` (tests, tools): the graph, after the checks
        dynamo's guards on grad mode and the inputs' dtypes would have made."""
        if torch.is_grad_enabled():
            raise EngineError("a compiled decode graph runs only in inference mode")
        if input_ids.dtype != torch.long or positions.dtype != torch.long:
            raise EngineError("a compiled decode graph takes int64 token ids and positions")
        return self.call(input_ids, positions)

    def call(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The graph, unchecked: `CompiledDecode` calls it per step, always in inference mode
        (`forward`, `warm_up`) with the int64 ids and positions the runner makes."""
        args = list(self.args)
        for i, get in self.per_step:
            args[i] = get(input_ids, positions)
        (hidden,) = self.compiled(*args)
        return hidden


class CompiledDecode:
    """The model's forward for pure decode steps of up to `max_batch` sequences, compiled
    as one graph. Same inputs and result as `LlamaModel.forward`."""

    max_batch = KERNEL_MAX_ROWS

    def __init__(self, model: LlamaModel) -> None:
        if not torch_supports_compile():
            raise NotSupportedError(
                f"EngineConfig.compile=True needs torch >= {'.'.join(map(str, MIN_TORCH))}"
                f" (installed: {torch.__version__}); compile=False runs the same model eagerly"
            )
        self.model = model
        self.threads: int | None = None  # torch's thread count the graphs were warmed at
        self.compiled_steps = 0  # steps that ran the compiled graph
        self.eager_steps = 0  # steps run by the plain model: another thread count
        self._views: tuple | None = None  # (pool, its per-layer key and value views)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()  # read at each compile
        self._direct: dict[int, _DirectGraph] = {}  # batch size -> the graph dynamo chose
        self._ran: _DirectGraph | None = None  # the graph the last dynamo call ran
        self._graphs: list[_DirectGraph] = []  # every graph compiled for this model
        self._fingerprint: tuple | None = None  # a few of the model's tensors at warm-up
        self._changed = False  # they were replaced since: the plain model runs every step
        # Dynamo keeps every backend for the life of the process (`cached_backends`): the
        # backend and the graph wrappers it returns hold this object only weakly, or every
        # dropped engine would keep its model, its KV pool and its graphs alive.
        owner = weakref.ref(self)

        def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            return CompiledDecode._compile_graph(_alive(owner), gm, example_inputs)

        self._step: Callable = torch.compile(
            _own_copy(_decode_step),
            backend=backend,
            dynamic=True,
            fullgraph=True,
            options={"guard_filter_fn": _drop_model_guards},
        )

    def _compile_graph(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        """Dynamo's backend: inductor, keeping what calling the graph directly needs."""
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs, config_patches=dict(INDUCTOR_OPTIONS))
        graph = _DirectGraph.of(self.model, gm, example_inputs, compiled)
        # Dynamo keeps `run` in the step function's module globals for good: it holds the
        # graph (and its captured parameters) and this object only weakly. `_graphs` keeps
        # them alive as long as this object.
        self._graphs.append(graph)
        owner, graph_ref = weakref.ref(self), weakref.ref(graph)

        def run(*args):
            _alive(owner)._ran = graph_ref()
            return compiled(*args)

        return run

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # Dynamo guards on torch's thread count, which the thread governor lowers while
        # other processes keep the CPUs busy. At a count the graphs were not warmed at, the
        # plain model runs the step: recompiling in the middle of serving takes minutes,
        # and dynamo's own eager fallback (the custom op per layer, guards) is slower than
        # the plain model.
        if self.threads is not None and torch.get_num_threads() != self.threads:
            self.eager_steps += 1
            return self.model(input_ids, positions, kv_cache, meta)
        if self._model_changed():
            self.eager_steps += 1
            return self.model(input_ids, positions, kv_cache, meta)
        self.compiled_steps += 1
        return self._run(input_ids, positions, kv_cache, meta)

    def _model_changed(self) -> bool:
        """Whether the model's tensors were replaced since its graphs were compiled (new
        Parameter objects, a swapped module, `param.data` of another dtype or shape): the
        graphs hold the old tensors and were checked for the old layouts, so from then on
        the plain model runs every step, as it did before the guards were dropped. Checked
        on a few tensors (the embedding, the first and last layer's qkv, the final norm), a
        cost of ~10 us a step: it catches a model swapped as a whole, not one weight
        replaced elsewhere, which the engine never does and `EngineConfig.compile` documents
        as unsupported."""
        if self._fingerprint is None or self._changed:
            return self._changed
        if _fingerprint(self.model) != self._fingerprint:
            log.warning("the model's weights were replaced under a compiled engine: its decode"
                        " steps run eagerly from now on")
            self._changed = True
            self._direct.clear()
            self._graphs.clear()
        return self._changed

    def _run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The compiled step. A batch size's first step goes through dynamo, which checks
        its guards and picks (or compiles) the graph; later steps of that size call that
        graph directly (`_DirectGraph`), without dynamo's frame, guards and argument list.
        After the warm-up, a step whose guards no graph passes runs dynamo's eager
        fallback rather than compiling in the middle of serving (`eager_on_recompile`)."""
        step_context.attn = StepAttention(kv_cache, self._layer_views(kv_cache), meta)
        try:
            graph = self._direct.get(input_ids.shape[0])
            if graph is not None:
                return graph.call(input_ids, positions)
            self._ran = None
            stance = "eager_on_recompile" if self.threads is not None else "default"
            with torch.compiler.set_stance(stance), _trace_config():
                out = self._step(self.model, input_ids, positions)
            if self._ran is not None and self._ran.callable:
                self._direct[input_ids.shape[0]] = self._ran
            return out
        finally:
            step_context.attn = None

    def _layer_views(self, kv: torch.Tensor) -> tuple:
        """Per layer, the pool's keys and values [KVH, S, Dh]: made once per pool."""
        if self._views is None or self._views[0] is not kv:
            self._views = (kv, (kv[:, 0].unbind(0), kv[:, 1].unbind(0)))
        return self._views[1]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 2), progress: bool = True) -> float:
        """Compile (or load from the cache) the graphs decode steps use, before any request:
        batch size 1 is specialized by torch, 2 stands for every larger one. The warm-up
        steps write a scratch pool, not the engine's. Returns the seconds it took; prints
        progress on stderr when `progress`. Errors are torch's, as raised
        (`engine_decode_step` words them for the engine)."""
        start = time.perf_counter()
        self._fingerprint = _fingerprint(self.model)
        args = self.model.args
        # The final norm's weight is dense whatever the quantization (an int4 model's
        # embedding table is packed int8): it gives the device and the compute dtype.
        dev, dtype = self.model.norm.weight.device, self.model.norm.weight.dtype
        block = 16
        pool = torch.zeros(
            args.num_layers, 2, args.num_kv_heads, block * max(batch_sizes), args.dim_per_head,
            dtype=dtype, device=dev,
        )
        bar = _progress(len(batch_sizes), progress)
        try:
            for n in batch_sizes:
                bar.set_description(f"compiling the decode step (batch {n})")
                with torch.inference_mode():
                    self._run(*_scratch_step(n, dev), pool, _scratch_meta(n, block, dev))
                bar.update(1)
        finally:
            bar.close()
        self.threads = torch.get_num_threads()
        took = time.perf_counter() - start
        log.info("decode step compiled in %.1f s (cache: %s)", took, inductor_cache_dir())
        return took


def torch_supports_compile() -> bool:
    """Whether the installed torch is MIN_TORCH or newer (`TorchVersion` compares to tuples)."""
    return torch.__version__ >= MIN_TORCH


def _fingerprint(model: LlamaModel) -> tuple:
    """Identity, storage, dtype and shape of a few of the model's tensors (a few
    microseconds a step): what a replaced weight or module changes."""
    modules = (
        model.embed_tokens,
        model.layers[0].self_attn.qkv_proj,
        model.layers[-1].self_attn.qkv_proj,
        model.norm,
    )
    return tuple(
        (id(t), t.data_ptr(), t.dtype, t.shape)
        for m in modules
        for t in (*m._parameters.values(), *m._buffers.values())
        if t is not None
    ) + (len(model.layers),)


def _alive(owner: weakref.ref) -> CompiledDecode:
    compiled = owner()
    if compiled is None:  # only its own engine calls the step function, and holds it
        raise EngineError("a compiled decode step ran after its engine was dropped")
    return compiled


def _scratch_step(n: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and positions of `n` sequences, each at position 0."""
    zeros = torch.zeros(n, dtype=torch.long, device=dev)
    return zeros, zeros.clone()


def _scratch_meta(n: int, block: int, dev: torch.device) -> AttentionMetadata:
    """Attention metadata of `_scratch_step`: one key each, sequence i in block i."""
    blocks = torch.arange(n, device=dev)
    if n == 1:
        group = DecodeGroup(0, 1, None, 1, None, 0)
    else:
        group = DecodeGroup(0, n, blocks[:, None], 1, None)
    return AttentionMetadata(blocks * block, n, block, [], [group])


class _Silent:
    def set_description(self, _: str) -> None: ...
    def update(self, _: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, show: bool):
    if not show:
        return _Silent()
    from tqdm import tqdm

    return tqdm(total=total, unit="graph", leave=False)
