"""Compressed activations at run time: packed when autograd saves them, unpacked in backward.

``insert_marks`` adds a call after every compressed node (after the last node of its
decision unit, so in-place ops tied to it have run) that tells the running
:class:`CompressionSession` "this storage is compressed with this option". The session's
``saved_tensors_hooks`` wrap every tensor autograd saves during the planned forward:

* a saved tensor whose storage is marked is packed: **one packed copy per storage**, however
  many ops save it (each saved view keeps its size, stride and offset and is rebuilt from
  the one unpacked storage);
* a tensor saved *before* its storage is marked (an op saving its own output, such as
  ``relu``) is held as is until the mark, then packed, and the full tensor is released, so
  nothing keeps the full-precision copy alive once forward is done with it;
* parameters, model inputs, unmarked storages and non-float tensors are saved unchanged.

The hooks are entered around the whole planned forward, outside the checkpoint regions:
inside a region checkpoint's own hooks take over (recomputation is unaffected), and a
region's inputs pass through these hooks, so a region whose input is compressed replays
from the unpacked input.

Unpacking shares work: while one unpacked copy of a storage is alive (for example, held by
a region being replayed), other ops that saved the same storage reuse it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping

import torch
import torch.fx

from fedplan.kernels import dequantize, quantize
from fedplan.planner.compression import option_of, storage_order

_ACTIVE = threading.local()


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class _PackedStorage:
    """One packed copy of a whole storage, and a weak handle on its unpacked form."""

    __slots__ = ("packed", "dtype", "version", "unpacked", "__weakref__")

    def __init__(self, base: torch.Tensor, option):
        self.packed = quantize(base, **option.kernel_args())
        self.dtype = base.dtype
        self.version = base._version
        self.unpacked = None

    def unpack(self) -> torch.Tensor:
        if self.unpacked is not None:
            alive = self.unpacked()
            if alive is not None:
                return alive
        base = dequantize(self.packed)
        self.unpacked = weakref.ref(base)
        return base


class _Saved:
    """What the pack hook returns: the tensor itself, or a view of a packed storage."""

    __slots__ = ("tensor", "storage", "view", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.storage: _PackedStorage | None = None
        self.view = None
        self.version = tensor._version

    def attach(self, storage: _PackedStorage) -> bool:
        t = self.tensor
        if (t.dtype != storage.dtype or t._version != self.version
                or t._version != storage.version):
            return False  # another dtype's view, or changed in place: keep it as is
        self.view = (tuple(t.shape), tuple(t.stride()), t.storage_offset())
        self.storage = storage
        self.tensor = None
        return True

    def get(self) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor
        size, stride, offset = self.view
        return self.storage.unpack().as_strided(size, stride, offset)


class _Mark:
    """A compressed storage, pinned from its mark until its last forward reader.

    While pinned, the session holds the marked tensor (forward needs it until then anyway),
    so its storage cannot be freed and its address cannot be taken by another tensor:
    looking saved tensors up by address is safe. ``unpin`` drops the entry.
    """

    __slots__ = ("tensor", "option", "storage")

    def __init__(self, tensor: torch.Tensor, option):
        self.tensor = tensor
        self.option = option
        self.storage = None                 # weakref to the _PackedStorage, once made

    def packed(self) -> _PackedStorage:
        storage = self.storage() if self.storage is not None else None
        if storage is None:
            storage = _PackedStorage(self.tensor.detach(), self.option)
            self.storage = weakref.ref(storage)
        return storage


class CompressionSession:
    """The hooks of one planned forward; entered by the PlannedModule."""

    def __init__(self, param_keys: set[int]):
        self.param_keys = param_keys
        self.marked: dict[int, _Mark] = {}
        self.pinned: dict[str, int] = {}    # compressed node -> its storage's address
        self.pending: dict[int, list[_Saved]] = {}
        self.skipped: list[str] = []

    # -- saved_tensors_hooks ----------------------------------------------------------
    def pack(self, tensor: torch.Tensor):
        if not tensor.is_floating_point() or tensor.numel() == 0:
            return tensor
        key = _storage_key(tensor)
        if key in self.param_keys:
            return tensor
        saved = _Saved(tensor)
        mark = self.marked.get(key)
        if mark is not None:
            saved.attach(mark.packed())
            return saved
        self.pending.setdefault(key, []).append(saved)
        return saved

    @staticmethod
    def unpack(saved):
        return saved.get() if isinstance(saved, _Saved) else saved

    # -- marks ------------------------------------------------------------------------
    def mark(self, tensor: torch.Tensor, option_name: str, node: str) -> None:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            return
        key = _storage_key(tensor)
        nbytes = tensor.untyped_storage().nbytes()
        base = storage_order(tensor)
        if (base is None or tensor.storage_offset() != 0
                or tensor.numel() * tensor.element_size() != nbytes):
            self.skipped.append(node)  # not the whole of its storage: leave it as is
            return
        mark = _Mark(base, option_of(f"compress:{option_name}"))
        self.marked[key] = mark
        self.pinned[node] = key
        pending = self.pending.pop(key, [])
        if pending:
            storage = mark.packed()
            for saved in pending:
                saved.attach(storage)

    def unpin(self, node: str) -> None:
        """After the last forward reader of ``node``'s storage: forget it (see _Mark)."""
        key = self.pinned.pop(node, None)
        if key is not None:
            self.marked.pop(key, None)

    def close(self) -> None:
        """After the forward: drop every reference the session itself holds."""
        self.marked.clear()
        self.pinned.clear()
        self.pending.clear()


def _mark(tensor, option_name: str, node: str):
    session = getattr(_ACTIVE, "session", None)
    if session is not None and torch.is_grad_enabled():
        session.mark(tensor, option_name, node)
    return None



def _unpin(node: str):
    session = getattr(_ACTIVE, "session", None)
    if session is not None:
        session.unpin(node)
    return None


def insert_marks(graph_module: torch.fx.GraphModule, decisions: Mapping[str, str],
                 units: Mapping[str, str] | None = None,
                 last_readers: Mapping[str, str] | None = None) -> int:
    """Add ``_mark`` and ``_unpin`` calls for every compressed node; returns the marks.

    ``units`` maps a node to the node after which its mark goes (the last node of its
    decision unit); by default the mark follows the node itself. ``last_readers`` maps it
    to the last node that reads its storage in forward, after which it is unpinned (by
    default: the end of the forward).
    """
    graph = graph_module.graph
    by_name = {node.name: node for node in graph.nodes}
    position = {node.name: i for i, node in enumerate(graph.nodes)}
    count = 0
    marks = []
    for name, decision in decisions.items():
        option = option_of(decision)
        if option is None or name not in by_name:
            continue
        after = (units or {}).get(name, name)
        unpin_after = (last_readers or {}).get(name)
        if unpin_after in position and position[unpin_after] >= position[after]:
            with graph.inserting_after(by_name[unpin_after]):
                graph.call_function(_unpin, (name,))
        marks.append((after, name, option))
    for after, name, option in marks:  # after the unpins: at the same node, marks go first
        with graph.inserting_after(by_name[after]):
            graph.call_function(_mark, (by_name[name], option.name, name))
        count += 1
    if count:
        graph.lint()
        graph_module.recompile()
    return count


class active:
    """Context: run a forward with ``session``'s hooks."""

    def __init__(self, session: CompressionSession):
        self.session = session
        self.hooks = torch.autograd.graph.saved_tensors_hooks(session.pack, session.unpack)

    def __enter__(self):
        self.previous = getattr(_ACTIVE, "session", None)
        _ACTIVE.session = self.session
        self.hooks.__enter__()
        return self.session

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        _ACTIVE.session = self.previous
        self.session.close()
        return False
