"""Model runtimes: load a verified artifact on a device and run it with numpy tensors at the boundary."""

from __future__ import annotations

import functools
import importlib
import logging
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mesh.codec import DATATYPES
from mesh.errors import FailedPrecondition, Internal, InvalidArgument
from mesh_pb import common_pb2
from workers.models.export import load_program

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]

COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "": torch.float32,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

# Wire datatype -> the torch dtype an output is cast to before it leaves the device.
WIRE_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    # numpy has no bfloat16: BF16 outputs leave as float32 and the codec narrows them on the wire.
    "BF16": torch.float32,
}

# The numpy dtype each v2 datatype travels as (BF16 as float32: the codec narrows it on the wire).
WIRE_NUMPY_DTYPES = DATATYPES


def select_device(setting: str = "auto") -> torch.device:
    """Device for a worker: "auto" picks CUDA when present, else CPU."""
    setting = (setting or "auto").lower()
    if setting == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise FailedPrecondition(f"device: {setting!r} requested but CUDA is not available")
    return torch.device(setting if setting != "cuda" else "cuda:0")


def compute_dtype(name: str) -> torch.dtype:
    try:
        return COMPUTE_DTYPES[name.lower()]
    except KeyError:
        raise InvalidArgument(f"dtype: unsupported compute dtype {name!r} (fp32, fp16, bf16)") from None


def module_memory_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def dummy_inputs(signature: common_pb2.Signature, batch: int = 1) -> Arrays:
    """Small valid inputs built from a signature (-1 dims become 1, the batch dim `batch`)."""
    out: Arrays = {}
    for spec in signature.inputs:
        if spec.optional:
            continue
        shape = [
            batch if (i == 0 and signature.max_batch_size > 0) else (d if d >= 0 else 1)
            for i, d in enumerate(spec.shape)
        ]
        if spec.datatype == "BYTES":
            arr = np.empty(shape, dtype=np.object_)
            arr.fill(b"a")
            out[spec.name] = arr
        else:
            out[spec.name] = np.zeros(shape, dtype=WIRE_NUMPY_DTYPES.get(spec.datatype, np.float32))
    return out


_held = threading.local()


def hold_inference_mode() -> None:
    """Turns torch.inference_mode on in the calling thread for the rest of the thread's life.

    For threads that only ever serve: the worker process's event-loop thread and its compute threads.
    A forward pass on such a thread skips entering and leaving the mode, which costs about 15 µs of a
    small model's request on a CPU core between requests. Tensors made on such a thread are inference
    tensors, which autograd refuses, so never call it on a thread that trains.
    """
    if not torch.is_inference_mode_enabled():
        guard = torch.inference_mode()
        guard.__enter__()
        _held.guard = guard


def serving_thread_init(threads: int) -> None:
    """Initializer of the worker's compute threads: torch's thread count, inference mode held."""
    torch.set_num_threads(threads)
    hold_inference_mode()


class Runtime(ABC):
    """One loaded model version. `forward` and `generate` run in a worker thread, never on the event loop."""

    formats: ClassVar[tuple[str, ...]] = ()

    def __init__(self, version: common_pb2.ModelVersion, path: Path, device: torch.device) -> None:
        self.version = version
        self.path = path
        self.device = device
        self.dtype = compute_dtype(version.dtype)
        self.signature = version.signature
        self.input_names = [t.name for t in version.signature.inputs]
        self.output_specs = list(version.signature.outputs)
        self.memory_bytes = 0
        # Whether a runtime that can rewrite its graph exactly at load does (workers/graphopt.py).
        self.graph_rewrites = True

    @property
    def decoupled(self) -> bool:
        return self.signature.decoupled

    @functools.cached_property
    def output_types(self) -> dict[str, str]:
        """The signature's output datatypes by name."""
        return {s.name: s.datatype for s in self.output_specs}

    @abstractmethod
    def load(self) -> None:
        """Reads the artifact and places the model on the device."""

    @abstractmethod
    def forward(self, inputs: Mapping[str, np.ndarray]) -> Arrays:
        """One (possibly batched) forward pass."""

    def generate(self, inputs: Mapping[str, np.ndarray]) -> Iterator[Arrays]:
        """Decoupled models: yields one output dict per response."""
        raise InvalidArgument(f"model '{self.version.ref.name}' is not decoupled")

    def warmup(self) -> None:
        """Runs the model once on dummy inputs so the first request does not pay for lazy init."""
        inputs = dummy_inputs(self.signature)
        if self.decoupled:
            for _ in self.generate(inputs):
                break
        else:
            self.forward(inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:  # noqa: B027 (optional hook; runtimes holding nothing need not override it)
        """Drops references to the model so its memory can be freed."""


class TorchRuntime(Runtime):
    """Shared logic of the PyTorch runtimes: dtype casts at the boundary, inference_mode, output mapping."""

    module: Callable[..., Any] | None = None

    def _to_device(self, arr: np.ndarray) -> Any:
        if arr.dtype == np.object_:
            return [bytes(x) for x in arr.reshape(-1)]
        if not arr.flags.writeable:
            # Request tensors are views of the immutable message bytes; a model that writes to its
            # input must not corrupt them (a copy of a request-sized tensor costs microseconds).
            arr = arr.copy()
        t = torch.from_numpy(arr)
        if t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        if self.device.type != "cpu":
            t = t.to(self.device, non_blocking=True)
        return t

    def _outputs(self, result: Any) -> Arrays:
        if isinstance(result, Mapping):
            items = list(result.items())
        else:
            values = list(result) if isinstance(result, (tuple, list)) else [result]
            names = [s.name for s in self.output_specs] or [f"output__{i}" for i in range(len(values))]
            if len(values) != len(names):
                raise Internal(f"model returned {len(values)} outputs, signature declares {len(names)}")
            items = list(zip(names, values, strict=True))
        specs = self.output_types
        out: Arrays = {}
        for name, value in items:
            if not isinstance(value, torch.Tensor):
                out[name] = np.asarray(value)
                continue
            target = WIRE_TORCH_DTYPES.get(specs.get(name, ""), None)
            if target is None and value.is_floating_point():
                target = torch.float32  # the wire stays FP32 whatever the compute dtype
            if target is not None and value.dtype != target:
                value = value.to(target)
            # Each tensor method is a dispatcher round trip: only the ones that change something.
            if value.requires_grad:
                value = value.detach()
            if value.device.type != "cpu":
                value = value.cpu()
            out[name] = value.numpy()
        return out

    def forward(self, inputs: Mapping[str, np.ndarray]) -> Arrays:
        assert self.module is not None, "runtime not loaded"
        args = [self._to_device(inputs[n]) for n in self.input_names if n in inputs]
        if torch.is_inference_mode_enabled():  # a worker thread (hold_inference_mode)
            return self._outputs(self._call(args))
        with torch.inference_mode():
            return self._outputs(self._call(args))

    def _call(self, args: list[Any]) -> Any:
        """The model on positional device tensors (signature order, absent optional inputs left out)."""
        assert self.module is not None, "runtime not loaded"
        return self.module(*args)

    def close(self) -> None:
        self.module = None


class TorchExportRuntime(TorchRuntime):
    """`.pt2` programs saved with torch.export.save; loaded with torch.export.load and `.module()`."""

    formats = ("torch_export", "pt2")
    _lifted: Callable[[list[Any]], Any] | None = None

    def load(self) -> None:
        from torch.export.passes import move_to_device_pass

        ep = load_program(self.path)
        if self.device.type != "cpu":
            ep = move_to_device_pass(ep, self.device)
        module = _flat_call(ep.module())
        if self.dtype != torch.float32:
            module = module.to(self.dtype)
        self.memory_bytes = module_memory_bytes(module)
        self.module = module
        sample = self._sample_args if self.graph_rewrites else None
        self._lifted, extra_bytes = _lifted_call(ep, module, len(self.input_names), sample)
        self.memory_bytes += extra_bytes

    def _sample_args(self) -> list[Any]:
        """Random device tensors for every input, in signature order (to check a rewritten graph);
        optional inputs are left out, as dummy_inputs does."""
        gen = np.random.default_rng(0)
        args = []
        for arr in dummy_inputs(self.signature, batch=2).values():
            if arr.dtype.kind == "f":
                arr = gen.standard_normal(arr.shape).astype(arr.dtype)
            elif arr.dtype.kind in "iu":
                arr = gen.integers(0, 2, arr.shape).astype(arr.dtype)
            args.append(self._to_device(arr))
        return args

    def _call(self, args: list[Any]) -> Any:
        lifted = self._lifted
        if lifted is None or len(args) != len(self.input_names):  # an optional input left out
            return super()._call(args)
        return lifted(args)

    def close(self) -> None:
        self._lifted = None
        super().close()


def _lifted_call(
    ep: torch.export.ExportedProgram,
    module: Any,
    n_inputs: int,
    sample: Callable[[], list[Any]] | None = None,
) -> tuple[Callable[[list[Any]], Any] | None, int]:
    """Calls the exported graph itself, with its lifted parameters, buffers and constants passed in.

    `ep.module()` wraps that graph in a module that re-flattens arguments, runs input guards and calls
    through nn.Module hooks on every call: about 30-40 µs per call on a CPU core, as much as a small
    model's whole forward. The worker validates inputs against the signature itself (the codec) and
    always passes positional tensors in signature order, so it can call the graph directly. The tensors
    come from `module` (the unlifted module, already moved and cast), so both paths share one copy of
    the weights (a buffer the graph updates in place is the module's own). Programs whose graph returns
    buffer mutations or anything but plain outputs, or takes inputs other than `n_inputs` positional
    tensors, keep the module path (None). Also returns the bytes of tensors the call holds beyond the
    module's own (a weight a rewrite had to copy).

    With `sample` (random inputs for the check), the graph called is a copy with the exact rewrites of
    workers/graphopt.py, once it has given the same outputs as the original on those inputs.
    """
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    try:
        sig = ep.graph_signature
        if any(s.kind != OutputKind.USER_OUTPUT for s in sig.output_specs):
            return None, 0
        named = dict(module.named_parameters(remove_duplicate=False))
        named.update(module.named_buffers(remove_duplicate=False))
        template: list[Any] = []
        slots: list[int] = []
        for spec in sig.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                if not isinstance(spec.arg, TensorArgument):
                    return None, 0
                slots.append(len(template))
                template.append(None)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                value = named.get(spec.target) if spec.target is not None else None
                if value is None and spec.target is not None:
                    value = functools.reduce(getattr, spec.target.split("."), module)
                if not isinstance(value, torch.Tensor):
                    return None, 0
                template.append(value)
            else:  # custom objects, tokens
                return None, 0
        if len(slots) != n_inputs:
            return None, 0
        forward = ep.graph_module.forward
    except Exception as exc:  # an unexpected layout: the module path still works
        log.debug("exported program keeps its module call: %s", exc)
        return None, 0
    extra_bytes = 0
    if sample is not None:
        optimized = _optimized_forward(ep.graph_module, template, slots, sample)
        if optimized is not None:
            forward, extra_bytes = optimized

    def call(args: list[Any]) -> Any:
        full = template.copy()
        for slot, value in zip(slots, args, strict=True):
            full[slot] = value
        return forward(*full)

    return call, extra_bytes


def _optimized_forward(
    gm: torch.fx.GraphModule, template: list[Any], slots: list[int], sample: Callable[[], list[Any]]
) -> tuple[Callable[..., Any], int] | None:
    """The forward of `gm` rewritten by workers/graphopt.py and the bytes of the tensors it holds that
    `template` does not; None when there is nothing to rewrite, a rewrite fails, or the outputs differ
    from the original graph's on sample inputs."""
    from workers import graphopt

    try:
        new, count = graphopt.optimize(gm, template, slots)
        if not count:
            return None
        full = template.copy()
        for slot, value in zip(slots, sample(), strict=True):
            full[slot] = value
        with torch.inference_mode():
            expected = gm.forward(*full)
            got = new.forward(*full)
        if len(expected) != len(got) or not all(_same(a, b) for a, b in zip(expected, got, strict=True)):
            log.warning("graph rewrites changed the outputs on sample inputs; keeping the original graph")
            return None
    except Exception as exc:  # the original graph still works
        log.debug("graph rewrites skipped: %s", exc)
        return None
    log.debug("graph rewrites: %d", count)
    return new.forward, graphopt.extra_bytes(new, template)


def _same(a: Any, b: Any) -> bool:
    """Equal bit for bit (NaN where the other has NaN counts as equal), for tensors; == otherwise."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return bool(a == b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _is_flat(spec: Any) -> bool:
    return spec.is_leaf() or (
        spec.type in (tuple, list) and all(child.is_leaf() for child in spec.children())
    )


def _flat_call(module: Any) -> Any:
    """Drops the pytree (un)flattening and the input guards of an exported module's forward.

    They cost several times the forward of a small model (measured: ~4x for a 64-32-10 MLP). Safe here
    because the worker always calls with positional tensors in signature order (validated against the
    signature by the codec first) and maps outputs by position. Programs with nested or keyword inputs,
    or non-flat outputs, keep the stock forward.
    """
    try:
        args_spec, kwargs_spec = module._in_spec.children()
        if kwargs_spec.num_children or not _is_flat(args_spec) or not _is_flat(module._out_spec):
            return module
        graph = module.graph
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
                graph.erase_node(node)
        graph._codegen = torch.fx.graph.CodeGen()
        module.recompile()
    except Exception as exc:  # any other layout: the stock forward still works
        log.debug("exported module keeps its pytree forward: %s", exc)
    return module


class TorchScriptRuntime(TorchRuntime):
    """TorchScript archives users already have (loaded only; the project exports with torch.export)."""

    formats = ("torchscript",)

    def load(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(self.path), map_location=self.device)
        module.eval()
        if self.dtype != torch.float32:
            module = module.to(self.dtype)
        self.memory_bytes = module_memory_bytes(module)
        self.module = module


QUANTIZERS: dict[str, tuple[str, str]] = {
    "int8_dynamic": ("torchao.quantization", "Int8DynamicActivationInt8WeightConfig"),
    "int8_weight_only": ("torchao.quantization", "Int8WeightOnlyConfig"),
    "int8_weight": ("torchao.quantization", "Int8WeightOnlyConfig"),
    "int4_weight_only": ("torchao.quantization", "Int4WeightOnlyConfig"),
    "float8_weight_only": ("torchao.quantization", "Float8WeightOnlyConfig"),
}


def apply_quantization(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """Applies a named torchao quantization to a float module (in place; returns it)."""
    models = _models_package()
    hook = getattr(models, "apply_quantization", None) if models is not None else None
    if hook is not None:
        return hook(module, name)  # type: ignore[no-any-return]
    if name not in QUANTIZERS:
        raise FailedPrecondition(f"quantize: unknown quantization {name!r} (known: {', '.join(QUANTIZERS)})")
    mod_name, cls_name = QUANTIZERS[name]
    mod = importlib.import_module(mod_name)
    quantize_ = mod.quantize_
    quantize_(module, getattr(mod, cls_name)())
    return module


def _models_package() -> Any:
    try:
        return importlib.import_module("workers.models")
    except ImportError:
        return None


class ModuleStateRuntime(TorchRuntime):
    """`module_state` files: {"arch", "config", "state_dict", "quantize"} rebuilt by workers.models.build.

    Loaded with torch.load(weights_only=True) only. A module with `generate(**inputs) -> Iterator[str]` serves
    decoupled (streaming) versions: each yielded string becomes one response of the first output.
    """

    formats = ("module_state", "tinylm")

    def load(self) -> None:
        payload = torch.load(str(self.path), map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or "arch" not in payload or "state_dict" not in payload:
            raise FailedPrecondition(
                "artifact_uri: module_state file must hold 'arch', 'config', 'state_dict'"
            )
        models = _models_package()
        if models is None or not hasattr(models, "build"):
            raise FailedPrecondition(
                "format: module_state needs workers.models.build, which is not available"
            )
        module = models.build(str(payload["arch"]), dict(payload.get("config") or {}))
        module.load_state_dict(payload["state_dict"])
        module.eval()
        quantize = payload.get("quantize")
        if quantize:
            # torchao's int8 kernels are CPU/CUDA float32/bf16; quantize after the dtype cast.
            if self.dtype != torch.float32:
                module = module.to(self.dtype)
            module = apply_quantization(module, str(quantize))
            module = module.to(self.device)
        else:
            module = module.to(device=self.device, dtype=self.dtype)
        self.memory_bytes = module_memory_bytes(module)
        self.module = module

    def generate(self, inputs: Mapping[str, np.ndarray]) -> Iterator[Arrays]:
        module = self.module
        gen = getattr(module, "generate", None)
        if gen is None:
            raise InvalidArgument(f"model '{self.version.ref.name}' has no generate()")
        kwargs: dict[str, Any] = {}
        for name, arr in inputs.items():
            flat = arr.reshape(-1)
            if arr.dtype == np.object_:
                first = flat[0] if flat.size else b""
                kwargs[name] = first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)
            elif flat.size == 1:
                kwargs[name] = flat[0].item()
            else:
                kwargs[name] = torch.from_numpy(arr)
        max_tokens = kwargs.get("max_tokens")
        # The model caps a huge count itself (MAX_GENERATE_TOKENS); asking for none is the client's error.
        if isinstance(max_tokens, int) and max_tokens < 1:
            raise InvalidArgument(f"max_tokens: must be at least 1, got {max_tokens}")
        out_name = self.output_specs[0].name if self.output_specs else "output__0"
        chunks = iter(gen(**kwargs))
        while True:
            # Inference mode for each step, never across a yield: a generation resumes on whichever
            # compute thread is free (ModelManager.generate), and a `with` block spanning yields would
            # end on another thread than it began, leaving that thread's mode changed for good.
            with torch.inference_mode():
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
            if isinstance(chunk, Mapping):
                yield self._outputs(chunk)
            elif isinstance(chunk, str | bytes):
                data = chunk.encode("utf-8") if isinstance(chunk, str) else chunk
                arr = np.empty([1], dtype=np.object_)
                arr[0] = data
                yield {out_name: arr}
            else:
                yield self._outputs(chunk)


# onnxruntime's tensor type names -> numpy dtypes (bfloat16 has no numpy dtype: such inputs are fed as is).
ONNX_NUMPY_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(string)": np.object_,
}


def _pair_names(declared: list[str], graph: list[str], field: str) -> list[tuple[str, str]]:
    """(signature name, graph name) pairs: by name when every declared name is in the graph, else by
    position (a signature may rename the graph's tensors); no signature = the graph's own names."""
    if not declared:
        return [(g, g) for g in graph]
    if set(declared) <= set(graph):
        return [(d, d) for d in declared]
    if len(declared) > len(graph):
        raise FailedPrecondition(
            f"signature.{field}: {len(declared)} declared, the ONNX graph has {len(graph)} ({', '.join(graph)})"
        )
    return list(zip(declared, graph[: len(declared)], strict=True))


class OnnxRuntime(Runtime):
    """ONNX models through onnxruntime (optional extra `onnx`); CUDA provider when present.

    Tensors map to the graph's inputs/outputs by name (by position when the signature renames them). Inputs
    are cast to the graph's element types (an fp16 graph keeps an FP32 wire); outputs to the signature's
    datatypes. On CPU, ONNX Runtime uses as many intra-op threads as torch does (MAAS_WORKER_TORCH_THREADS).
    """

    formats = ("onnx",)
    session: Any = None

    def load(self) -> None:
        try:
            import onnxruntime as ort  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError:
            raise FailedPrecondition("format: onnx needs the optional onnxruntime package") from None
        providers: list[Any] = ["CPUExecutionProvider"]
        on_cuda = self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        if on_cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        elif self.device.type == "cuda":
            log.warning(
                "%s:%s runs on CPU: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)",
                self.version.ref.name,
                self.version.ref.version,
            )
        options = ort.SessionOptions()
        if not on_cuda:
            options.intra_op_num_threads = max(1, torch.get_num_threads())
        session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        graph_inputs = {i.name: i.type for i in session.get_inputs()}
        graph_outputs = [o.name for o in session.get_outputs()]
        self._feed = [
            (name, onnx_name, ONNX_NUMPY_DTYPES.get(graph_inputs[onnx_name]))
            for name, onnx_name in _pair_names(self.input_names, list(graph_inputs), "inputs")
        ]
        declared = [s.name for s in self.output_specs]
        wire = {s.name: WIRE_NUMPY_DTYPES.get(s.datatype) for s in self.output_specs}
        pairs = _pair_names(declared, graph_outputs, "outputs")
        self._fetch = [onnx_name for _, onnx_name in pairs]
        self._outputs_as = [(name, wire.get(name)) for name, _ in pairs]
        self.memory_bytes = self.path.stat().st_size
        self.session = session

    def forward(self, inputs: Mapping[str, np.ndarray]) -> Arrays:
        assert self.session is not None, "runtime not loaded"
        feed: dict[str, np.ndarray] = {}
        for name, onnx_name, dtype in self._feed:
            arr = inputs.get(name)
            if arr is None:  # an optional input the request left out
                continue
            if dtype is not None and arr.dtype != dtype:
                arr = arr.astype(dtype)
            feed[onnx_name] = arr
        results = self.session.run(self._fetch, feed)
        out: Arrays = {}
        for (name, dtype), value in zip(self._outputs_as, results, strict=True):
            arr = np.asarray(value)
            if dtype is None and arr.dtype.kind == "f":
                dtype = np.float32  # the wire stays FP32 whatever the graph computes in
            if dtype is not None and arr.dtype != dtype and dtype is not np.object_:
                arr = arr.astype(dtype)
            out[name] = arr
        return out

    def close(self) -> None:
        self.session = None


RUNTIMES: dict[str, type[Runtime]] = {
    fmt: cls
    for cls in (TorchExportRuntime, TorchScriptRuntime, ModuleStateRuntime, OnnxRuntime)
    for fmt in cls.formats
}


def create_runtime(version: common_pb2.ModelVersion, path: Path, device: torch.device) -> Runtime:
    """Runtime for a version's format (not yet loaded)."""
    cls = RUNTIMES.get(version.format.lower())
    if cls is None:
        raise FailedPrecondition(
            f"format: unsupported artifact format {version.format!r} (known: {', '.join(sorted(RUNTIMES))})"
        )
    return cls(version, path, device)


def load_runtime(
    version: common_pb2.ModelVersion,
    path: Path,
    device: torch.device,
    *,
    warmup: bool = True,
    graph_rewrites: bool = True,
) -> Runtime:
    """Creates, loads and warms up a runtime (blocking: call it from a worker thread)."""
    runtime = create_runtime(version, path, device)
    runtime.graph_rewrites = graph_rewrites
    try:
        runtime.load()
        if warmup:
            runtime.warmup()
    except (FailedPrecondition, InvalidArgument):
        runtime.close()
        raise
    except Exception as exc:
        runtime.close()
        raise Internal(
            f"load of {version.ref.name}:{version.ref.version} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return runtime
