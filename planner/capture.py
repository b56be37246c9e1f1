"""Capture a model with ``torch.export`` (non-strict, training IR) into a flat GraphModule.

Why torch.export and not ``torch.fx.symbolic_trace``: symbolic tracing stops at the first
construct that needs a real value (Hugging Face BERT slices a buffer by a traced length,
GPT-2 and Llama branch on sizes while building their masks, a nanoGPT decoder calls
``torch.ones(t, t)`` on a traced size). Non-strict export runs the model's Python on fake
tensors, so such code runs as written, and shapes are specialised to the example batch
(a plan is made for one batch size anyway). Measured here: BERT, GPT-2, Llama + LoRA, a
nanoGPT decoder and MobileViT captured with the loss equal to eager.

The captured graph is the *unlifted* training IR (``ExportedProgram.module()``): high-level
ATen ops (``aten.conv2d``, ``aten.linear``, ``aten.batch_norm``, in-place ops such as
``aten.relu_`` kept in place), parameters and buffers read by ``get_attr`` from the very
tensors of the user's model (no copies), buffer mutations (BatchNorm statistics) done in
place where the model does them. fedplan strips the pytree calling convention: the graph
takes the flattened leaves of ``(args, kwargs)`` and returns the flattened outputs, and
:class:`Captured` carries the two tree specs to go back and forth. Every node keeps its
module path (``nn_module_stack``) and the user's source line for summaries and errors.
"""

from __future__ import annotations

import contextlib
import logging
import re
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from .errors import BadInputError, TraceError

#: keys fedplan writes into ``node.meta`` (read out once into the IR by ``planner.trace``)
META_MODULE = "fedplan_module"      # (qualified module path, module class name)
META_SOURCE = "fedplan_source"      # "file.py:LINE" of the user's code that made the node


@dataclass(frozen=True)
class ModelCall:
    """How the model is called: positional ``args`` and keyword ``kwargs``.

    ``ModelCall.of`` accepts what a model file's ``example_batch`` returns as inputs: a
    tensor, a tuple or list (positional), or a dict (keyword, Hugging Face style).
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, inputs: Any) -> ModelCall:
        if isinstance(inputs, ModelCall):
            return inputs
        if isinstance(inputs, torch.Tensor):
            return cls((inputs,), {})
        if isinstance(inputs, (tuple, list)):
            return cls(tuple(inputs), {})
        if isinstance(inputs, dict):
            if not all(isinstance(key, str) for key in inputs):
                raise BadInputError("expected keyword inputs as a dict with str keys; found "
                                    f"keys {list(inputs)!r}")
            return cls((), dict(inputs))
        raise BadInputError(
            f"expected the model's inputs as a tensor, a tuple of positional inputs or a dict "
            f"of keyword inputs; found {type(inputs).__name__}")

    def leaves(self) -> list[Any]:
        return pytree.tree_leaves((self.args, self.kwargs))

    def tensors(self) -> list[torch.Tensor]:
        return [leaf for leaf in self.leaves() if isinstance(leaf, torch.Tensor)]

    @property
    def batch_size(self) -> int:
        tensors = [t for t in self.tensors() if t.dim() > 0]
        if not tensors:
            raise BadInputError("expected at least one input tensor with a batch dimension; "
                                "found none")
        return int(tensors[0].shape[0])


@dataclass(frozen=True, eq=False)
class Captured:
    """A captured model: a flat GraphModule plus the specs of its inputs and outputs."""

    graph_module: torch.fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    notes: tuple[str, ...] = ()

    def flatten(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The graph's inputs for a call ``model(*args, **kwargs)``."""
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.in_spec:
            raise BadInputError(
                f"the planned model was captured for calls shaped "
                f"{_call_shape(self.in_spec)}; found a call shaped {_call_shape(spec)}; call "
                f"it the way example_batch's inputs were given")
        return leaves

    def unflatten(self, outputs: Any) -> Any:
        """What the model returns, from the graph's flat outputs."""
        return pytree.tree_unflatten(list(outputs), self.out_spec)


def _call_shape(spec: pytree.TreeSpec) -> str:
    try:
        args_spec, kwargs_spec = spec.children()
        keys = list(kwargs_spec.context or ())
        return f"({args_spec.num_leaves} positional, keywords {keys})"
    except Exception:  # an unusual spec: print it whole
        return str(spec)


def input_signature(call: ModelCall) -> dict[str, Any]:
    """The shapes and dtypes of a call's inputs, as plain data a plan can carry.

    With it a saved plan can capture its model again without the user's data (export
    runs on fake tensors, so zeros of the right shape and dtype are enough).
    """
    leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
    described = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            described.append({"shape": list(leaf.shape),
                              "dtype": str(leaf.dtype).replace("torch.", "")})
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            described.append({"value": leaf})
        else:
            raise BadInputError(
                f"expected inputs made of tensors and plain constants; found a "
                f"{type(leaf).__name__}")
    return {"spec": pytree.treespec_dumps(spec), "leaves": described}


def call_from_signature(signature: dict[str, Any]) -> ModelCall:
    """Zero inputs matching :func:`input_signature` (for capturing again)."""
    try:
        spec = pytree.treespec_loads(signature["spec"])
        leaves = []
        for leaf in signature["leaves"]:
            if "shape" in leaf:
                leaves.append(torch.zeros(leaf["shape"], dtype=getattr(torch, leaf["dtype"])))
            else:
                leaves.append(leaf["value"])
        args, kwargs = pytree.tree_unflatten(leaves, spec)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadInputError(f"the plan's input signature is not readable ({exc}); re-run "
                            f"`fedplan compile`, or pass example inputs") from exc
    return ModelCall(tuple(args), dict(kwargs))


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Keep torch's export loggers from printing graphs to the user's terminal on failure."""
    names = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export",
             "torch._dynamo", "torch._functorch", "torch._subclasses")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def _user_line(exc: BaseException) -> str:
    """The user's file and line that the failure points at, from torch's message or stack."""
    text = str(exc)
    found = [m for m in _FRAME.finditer(text) if not _is_library(m.group(1))]
    if found:
        path, line, _, code = found[-1].groups()
        return f"{path}:{line} ({code.strip()})"
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not _is_library(frame.filename):
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return ""


def _is_library(path: str) -> bool:
    path = path.replace("\\", "/")
    return any(part in path for part in ("/torch/", "/planner/", "/fedplan/", "/runtime/",
                                         "/site-packages/transformers/",
                                         "/site-packages/peft/", "<frozen", "<string>"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _capture_error(model: nn.Module, exc: BaseException) -> Exception:
    where = _user_line(exc)
    at = f" at {where}" if where else ""
    name = type(model).__name__
    message = _first_line(exc)
    if isinstance(exc, TypeError) and ("argument" in message or "positional" in message):
        return BadInputError(
            f"{name}'s forward does not accept the example inputs: {message}{at}; make "
            f"example_batch return inputs matching forward's signature (a tuple for "
            f"positional arguments, a dict for keyword arguments)")
    data_dependent = ("data-dependent" in message or "GuardOnDataDependent" in type(exc).__name__
                      or "data dependent" in message)
    if data_dependent:
        return TraceError(
            f"torch.export cannot capture {name}: control flow depends on a tensor's value"
            f"{at}; rewrite the branch with torch.where / torch.cond, or move it out of "
            f"forward (see https://pytorch.org/docs/stable/export.html)")
    if "Cache" in message and "pytree" in message:
        return TraceError(
            f"torch.export cannot capture {name}: it returns a key/value cache "
            f"({message.split(' in output')[0].replace('Found ', '')}){at}; build the model "
            f"with use_cache=False in its config (training needs no cache)")
    return TraceError(
        f"torch.export cannot capture {name}: {type(exc).__name__}: {message}{at}; rewrite "
        f"the construct (see https://pytorch.org/docs/stable/export.html)")


def _source_of(node: torch.fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = [m for m in _FRAME.finditer(trace) if not _is_library(m.group(1))]
    if not frames:
        frames = list(_FRAME.finditer(trace))
    if not frames:
        return ""
    path, line = frames[-1].group(1), frames[-1].group(2)
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def _module_of(node: torch.fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    # export's paths read like "L['self'].layer1[0].conv1" or "layer1.0.conv1"
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    path = re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules['", ".").replace("']", "")
    return path.strip("."), kind_name.rsplit(".", 1)[-1]


def capture(model: nn.Module, inputs: Any) -> Captured:
    """Capture ``model`` called with ``inputs`` (see :meth:`ModelCall.of`).

    The returned graph module reads the model's own parameters and buffers (no copies)
    and does not change them while capturing (export runs on fake tensors). It is always
    captured in training mode: dropout and BatchNorm's batch statistics are baked into
    the graph, since a plan is for training steps (``PlannedModule`` runs the user's own
    module in eval mode).
    """
    call = ModelCall.of(inputs)
    was_training = model.training
    model.train()  # a plan is for training steps: dropout and batch statistics on
    try:
        notes: list[str] = []
        with _quiet_export(), _checkpoint_inlined(notes):
            exported = torch.export.export(model, call.args, call.kwargs, strict=False)
    except (BadInputError, TraceError):
        raise
    except Exception as exc:
        raise _capture_error(model, exc) from exc
    finally:
        model.train(was_training)
    unlifted = exported.module()
    # a plain GraphModule over the same graph: it reads the same parameter and buffer
    # objects, and (unlike export's unlifted module) accepts train()/eval() calls
    graph_module = torch.fx.GraphModule(unlifted, unlifted.graph, type(model).__name__)
    # the flat calling convention: placeholders are the leaves of (args, kwargs)
    in_spec, out_spec = unlifted._in_spec, unlifted._out_spec
    for attribute in ("_in_spec", "_out_spec"):  # copied over; ours live in Captured
        graph_module.__dict__.pop(attribute, None)
    graph_module.graph._codegen = torch.fx.graph.CodeGen()
    for node in graph_module.graph.nodes:
        if node.op == "output" and not isinstance(node.args[0], (tuple, list)):
            node.args = ((node.args[0],),)
        module = _module_of(node)
        if module is not None:
            node.meta[META_MODULE] = module
        node.meta[META_SOURCE] = _source_of(node)
    _hoist_counter_updates(graph_module.graph)
    graph_module.recompile()
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return Captured(graph_module=graph_module, in_spec=in_spec, out_spec=out_spec,
                    notes=tuple(notes))


def _hoist_counter_updates(graph: torch.fx.Graph) -> None:
    """Move in-place updates of buffers that nothing else reads to the start of the step.

    Export writes BatchNorm's ``num_batches_tracked += 1`` as an ``add_`` on the buffer just
    before each ``batch_norm``. Nothing in the step reads the counter (momentum is a
    constant), so running the update first changes no value; left in place, each one
    would be a node that must stay outside checkpoint regions (it changes a buffer) and
    would cut every convolution-BatchNorm pair into two regions.
    """
    first = next((node for node in graph.nodes if node.op not in ("placeholder", "get_attr")),
                 None)
    if first is None:
        return
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if not schema.arguments or not schema.arguments[0].alias_info or \
                not schema.arguments[0].alias_info.is_write:
            continue  # not an in-place op on its first argument
        buffer = node.args[0]
        if not isinstance(buffer, torch.fx.Node) or buffer.op != "get_attr" or node.users:
            continue
        if set(buffer.users) != {node} or any(
                isinstance(arg, torch.fx.Node) and arg.op not in ("get_attr", "placeholder")
                for arg in node.all_input_nodes):
            continue  # something else reads the buffer, or the update reads an activation
        first.prepend(node)


@contextlib.contextmanager
def _checkpoint_inlined(notes: list[str]) -> Iterator[None]:
    """Run ``torch.utils.checkpoint`` calls inside the model as plain calls while capturing.

    fedplan decides recomputation for the whole graph; a model's own checkpoint call is
    disclosed in the notes (it would otherwise be captured as a higher-order op that the
    planner cannot look into).
    """
    import torch.utils.checkpoint as checkpoint_module

    original = checkpoint_module.checkpoint

    def inlined(function, *args, **kwargs):
        what = getattr(function, "__qualname__", None) or type(function).__name__
        note = (f"model calls torch.utils.checkpoint on {what}; "
                f"fedplan captures through it and decides recomputation for the whole graph")
        if note not in notes:
            notes.append(note)
        for key in ("use_reentrant", "context_fn", "determinism_check", "debug",
                    "preserve_rng_state"):
            kwargs.pop(key, None)
        return function(*args, **kwargs)

    checkpoint_module.checkpoint = inlined
    try:
        yield
    finally:
        checkpoint_module.checkpoint = original
