"""The model's state as the trainer sees it: where each leaf keeps its batch, and how a sample starts afresh.

The hidden state belongs to the model. The trainer passes it on from call to call and touches it in three ways
only, all through :class:`StateProtocol`:

- a **reset** starts some samples afresh (a document boundary, ``"resets"`` in the sequence info);
- a **hold** keeps a sample's old state over a padded step;
- a **cut** holds a sample's state constant for the gradient at the end of its burn-in.

Each works per sample, so each needs the batch axis of every tensor leaf (``hidden_batch_dim``: one int for all
leaves, or a structure of ints matching the hidden). A reset defaults to zeros, written with ``torch.where``
so that a NaN or inf state is cleared too and no gradient flows back past it; a model whose fresh state is not
zeros passes ``reset_hidden=fn(hidden, keep)``. The trainer never changes a leaf in place, and
:func:`call_model_checked` refuses a model that does.

The state the trainer keeps is the trainer's: :func:`call_model_checked` hands the model containers of its
own, so that a model that writes into the list or dict it is given (``caches[i] = ...``) cannot change the
state kept at a window start. ``None`` and non-tensor leaves (an optional memory not yet filled, a Python int)
are carried as they are; every tensor leaf, integer ones included, is reset and held per sample.
"""

import warnings
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_map, tree_unflatten

__all__ = [
    "DEFAULT_BATCH_DIM", "BatchDims", "DetachedStateCheck", "ResetFn", "StateProtocol", "call_model_checked",
    "detach_state", "reset_to_zeros",
]

Hidden = Any
#: ``hidden_batch_dim``: one int for every leaf, or a structure of ints matching the hidden state.
BatchDims = Any
#: ``reset_hidden(hidden, keep) -> hidden``: the state with the samples where ``keep`` is ``False`` fresh.
ResetFn = Callable[[Hidden, torch.Tensor], Hidden]


class _DefaultAxis(int):
    """``-2``, the default ``hidden_batch_dim``, told apart from a ``-2`` the user gave: a guess, not a fact."""


#: The default ``hidden_batch_dim``: ``-2``, which fits ``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` and their cells.
DEFAULT_BATCH_DIM = _DefaultAxis(-2)


def _leaf_name(path: Tuple[Any, ...]) -> str:
    return "hidden" + keystr(path) if path else "hidden"


def named_leaves(hidden: Hidden) -> List[Tuple[str, Any]]:
    """The hidden state's leaves with their names as Python would index them (``hidden['ssm']``)."""
    return [(_leaf_name(path), leaf) for path, leaf in tree_flatten_with_path(hidden)[0]]


def map_tensors(fn: Callable[[torch.Tensor], Any], hidden: Hidden) -> Hidden:
    """``hidden`` in new containers, with ``fn`` applied to every tensor leaf; ``None`` and other leaves kept.

    Ignite's ``apply_to_tensor`` refuses a ``None`` leaf, which a model with an optional memory returns.
    """
    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, hidden)


def detach_state(hidden: Hidden) -> Hidden:
    """A state (any nesting of tensors, ``None`` and other leaves) cut from its graph, in new containers.

    >>> detach_state({"h": torch.ones(1, requires_grad=True) * 2, "mem": None, "step": 3})
    {'h': tensor([2.]), 'mem': None, 'step': 3}
    """
    return map_tensors(torch.Tensor.detach, hidden)


def check_batch_dims(batch_dims: BatchDims) -> BatchDims:
    """``hidden_batch_dim`` as given, or a ``TypeError`` if it is not an int or a structure of ints."""
    leaves = tree_flatten(batch_dims)[0]
    if not leaves or any(isinstance(d, bool) or not isinstance(d, int) for d in leaves):
        raise TypeError(
            f"hidden_batch_dim must be an int or a structure of ints matching the hidden state, got {batch_dims!r}"
        )
    return batch_dims


def _batch_axis(t: torch.Tensor, name: str, batch_dim: int, batch_size: int) -> int:
    """``batch_dim`` as a non-negative axis of ``t``, or a ``ValueError`` that names the leaf and the fix."""
    if t.dim() == 0 or not -t.dim() <= batch_dim < t.dim() or t.shape[batch_dim] != batch_size:
        raise ValueError(
            f"the state leaf {name} of shape {tuple(t.shape)} has no batch axis of size {batch_size} at "
            f"hidden_batch_dim={batch_dim}; pass the batch axis of each hidden-state tensor as hidden_batch_dim "
            "(one int, or a structure of ints matching the hidden state)"
        )
    return batch_dim % t.dim()


def reset_to_zeros(hidden: Hidden, keep: torch.Tensor, protocol: "StateProtocol") -> Hidden:
    """The default reset: the samples where ``keep`` is ``False`` get zeros in every tensor leaf, integer and
    boolean ones (a step counter, a filled-slot flag) included.

    ``torch.where`` rather than a product: ``nan * 0`` is ``nan``, so a product would keep a non-finite state
    and send a ``nan`` gradient back past the reset.

    >>> h = torch.tensor([[1.0, float("nan")]])  # (layers, batch)
    >>> reset_to_zeros(h, torch.tensor([True, False]), StateProtocol(batch_dim=1)).tolist()
    [[1.0, 0.0]]
    """
    return protocol.per_sample(lambda t, k: torch.where(k, t, t.new_zeros(())), hidden, keep)


class StateProtocol:
    """How the trainer reads, resets and holds a model's hidden state, sample by sample.

    Args:
        batch_dim: the batch axis of every tensor leaf of the hidden state: one int for all (``-2`` fits
            ``nn.RNN``/``GRU``/``LSTM`` and the cells), or a structure of ints matching the hidden, such as
            ``{"ssm": 0, "conv": 0}``. Leaves that are not tensors (``None``, a Python int) are passed on
            untouched; integer tensors are reset and held as floating ones are.
        reset: ``reset(hidden, keep) -> hidden``, the state with the samples where ``keep`` (a ``(B,)`` bool
            tensor on the state's device) is ``False`` started afresh and the others unchanged; ``None``: zeros.
            It must cut the gradient of the fresh samples (``torch.where`` does) and may change no leaf in place.

    Example:
        >>> protocol = StateProtocol(batch_dim={"c": 0, "n": 0})
        >>> hidden = {"c": torch.ones(2, 3), "n": torch.ones(2, 3)}
        >>> fresh = protocol.reset(hidden, torch.tensor([True, False]))
        >>> fresh["c"].sum(1).tolist()
        [3.0, 0.0]
    """

    def __init__(self, batch_dim: BatchDims = DEFAULT_BATCH_DIM, reset: Optional[ResetFn] = None) -> None:
        if reset is not None and not callable(reset):
            raise TypeError(f"reset_hidden must be a function reset_hidden(hidden, keep) -> hidden, got {reset!r}")
        self.batch_dim, self.reset_fn = check_batch_dims(batch_dim), reset
        self.settled = False  # whether check() has established the batch axes of ambiguous leaves

    def _dims(self, hidden: Hidden, count: int) -> List[int]:
        """One batch axis per leaf of ``hidden`` (``count`` leaves)."""
        if isinstance(self.batch_dim, int):
            return [self.batch_dim] * count
        dims = tree_flatten(self.batch_dim)[0]
        if len(dims) != count:
            raise ValueError(
                f"hidden_batch_dim={self.batch_dim!r} has {len(dims)} axes, but the hidden state has {count} leaves: "
                f"give one int for every leaf of the hidden state ({[n for n, _ in named_leaves(hidden)]})"
            )
        return dims

    def per_sample(self, fn: Callable[..., torch.Tensor], hidden: Hidden, vector: torch.Tensor, *others: Hidden) -> Hidden:
        """``fn(leaf, v, *other_leaves)`` on every tensor leaf, ``v`` the ``(B,)`` ``vector`` shaped to broadcast
        along that leaf's batch axis; other leaves pass through. ``others`` are states of the same structure."""
        named = named_leaves(hidden)
        leaves, spec = tree_flatten(hidden)
        other_leaves = [tree_flatten(o)[0] for o in others]
        if any(len(o) != len(leaves) for o in other_leaves):
            raise ValueError("the model returned a hidden state of another structure than the one it was given")
        out = []
        for i, ((name, t), dim) in enumerate(zip(named, self._dims(hidden, len(leaves)))):
            if not isinstance(t, torch.Tensor):
                out.append(t)
                continue
            axis = _batch_axis(t, name, dim, vector.shape[0])
            shape = [1] * t.dim()
            shape[axis] = vector.shape[0]
            parts = [o[i] for o in other_leaves]
            for p in parts:
                if p.shape != t.shape:
                    raise ValueError(
                        f"the state leaf {name} changed shape from {tuple(p.shape)} to {tuple(t.shape)} over a span "
                        "that holds some samples' state (padding): a per-sample hold needs the same shape before "
                        "and after; pad the sequences of a model whose state grows along time to full length"
                    )
            out.append(fn(t, vector.to(t.device).view(shape), *parts))
        return tree_unflatten(out, spec)

    def reset(self, hidden: Hidden, keep: torch.Tensor) -> Hidden:
        """The samples where ``keep`` is ``False`` started afresh (``reset_hidden``, or zeros)."""
        if self.reset_fn is None:
            return reset_to_zeros(hidden, keep, self)
        return self.reset_fn(hidden, keep)

    def fresh_like(self, hidden: Hidden) -> Hidden:
        """A fresh state for every sample, in the structure and shapes of ``hidden``."""
        batch = self.batch_size(hidden)
        return self.reset(hidden, torch.zeros(batch, dtype=torch.bool, device=_device(hidden)))

    def hold(self, old: Optional[Hidden], new: Hidden, valid: torch.Tensor) -> Hidden:
        """``new`` for the samples where ``valid``, ``old`` for the others (a fresh state where ``old`` is ``None``):
        padding leaves a sample's state alone."""
        if old is None:
            old = self.reset(new, torch.zeros_like(valid))
        return self.per_sample(lambda n, v, o: torch.where(v, n, o), new, valid, old)

    def cut(self, hidden: Hidden, cut: torch.Tensor) -> Hidden:
        """The samples where ``cut`` held constant for the gradient (their values unchanged): a burn-in's end."""
        held = lambda t, c: torch.where(c, t.detach(), t) if t.requires_grad else t  # noqa: E731
        return self.per_sample(held, hidden, cut)

    def batch_size(self, hidden: Hidden) -> int:
        """The batch size read off the first tensor leaf at its batch axis."""
        leaves = tree_flatten(hidden)[0]
        for t, dim in zip(leaves, self._dims(hidden, len(leaves))):
            if isinstance(t, torch.Tensor) and t.dim() and -t.dim() <= dim < t.dim():
                return t.shape[dim]
        raise ValueError("the hidden state has no tensor with a batch axis at hidden_batch_dim")

    def check(
        self, hidden: Optional[Hidden], batch_size: int, probe: Optional[Callable[[], Tuple[Hidden, Hidden]]] = None
    ) -> None:
        """A ``ValueError`` naming the first tensor leaf without a batch axis of ``batch_size`` where
        ``hidden_batch_dim`` says: checked before the first update of a batch that resets, pads or burns in.

        A size alone does not make an axis the batch axis: a memory ``(B, n_mem, d)`` with ``n_mem == B`` has
        two. Where a leaf has another axis of the batch's size, ``probe()`` (once per protocol) gives the state
        of the same input run as it is and with the first sample's input changed, and the batch axis is the one
        along which only the first entry moves. It must be ``hidden_batch_dim``'s, else a ``ValueError`` names
        the one it is; where the probe cannot tell (a state that does not move with the input), a default
        ``hidden_batch_dim`` is not trusted either, and the ``ValueError`` asks for it.
        """
        if hidden is None:
            return
        self.per_sample(lambda t, v: t, hidden, torch.ones(batch_size, dtype=torch.bool))
        if probe is None or self.settled or batch_size < 2:
            return
        ambiguous = [(i, name, t) for i, (name, t) in enumerate(named_leaves(hidden))
                     if isinstance(t, torch.Tensor) and sum(n == batch_size for n in t.shape) > 1]
        if not ambiguous:
            return
        plain, changed = (tree_flatten(h)[0] for h in probe())
        dims = self._dims(hidden, len(tree_flatten(hidden)[0]))
        for i, name, t in ambiguous:
            axis = dims[i] % t.dim()
            pair = (plain[i], changed[i]) if i < min(len(plain), len(changed)) else (None, None)
            moved = [a for a, n in enumerate(t.shape) if n == batch_size and _moves_first_only(*pair, a)]
            given = not isinstance(self.batch_dim, _DefaultAxis)
            if moved == [axis] or (given and len(moved) != 1 and (axis in moved or not moved)):
                continue  # established, or given by the user and not contradicted
            candidates = [a for a, n in enumerate(t.shape) if n == batch_size]
            found = f"its samples lie along axis {moved[0]}" if len(moved) == 1 else (
                f"a probe that changes one sample's input could not tell which of its axes {candidates} holds them")
            raise ValueError(
                f"the state leaf {name} of shape {tuple(t.shape)} has the batch size {batch_size} at axes "
                f"{candidates}, and {found}, while hidden_batch_dim={self.batch_dim!r} says axis {axis}: resets and "
                "padding would work on the wrong axis. Pass the batch axis of each hidden-state tensor as "
                "hidden_batch_dim (one int, or a structure of ints matching the hidden state)"
            )
        self.settled = True


def _moves_first_only(plain: Any, changed: Any, axis: int) -> bool:
    """Whether ``changed`` differs from ``plain`` at the first entry along ``axis``, and only there."""
    if not (isinstance(plain, torch.Tensor) and isinstance(changed, torch.Tensor)) or plain.shape != changed.shape:
        return False
    moved = ~torch.isclose(changed, plain, rtol=1e-6, atol=0, equal_nan=True)
    entries = moved.movedim(axis, 0).reshape(moved.shape[axis], -1).any(1)
    return bool(entries[0]) and not bool(entries[1:].any())


def _device(hidden: Hidden) -> Any:
    for t in tree_flatten(hidden)[0]:
        if isinstance(t, torch.Tensor):
            return t.device
    return "cpu"


def own_containers(hidden: Optional[Hidden]) -> Optional[Hidden]:
    """``hidden`` in containers of its own (the same leaves): what a model writes into them stays there."""
    leaves, spec = tree_flatten(hidden)
    return tree_unflatten(leaves, spec)


def call_model_checked(call: Callable[[Any, Optional[Hidden]], Any], x: Any, hidden: Optional[Hidden]) -> Any:
    """``call(x, hidden)``, refused with a ``ValueError`` naming the leaf if the model changed ``hidden`` in place.

    The state handed to the model is shared with what the trainer keeps (the start of the next window, a
    retained graph's saved tensors): a leaf changed in place would corrupt them and give a wrong gradient. Each
    tensor's version counter tells, at the cost of reading it. The containers are another matter: a model may
    write into the list it is given (mambapy's ``Mamba.step`` assigns ``caches[i] = ...``), which no version
    counter sees. So the model gets containers of its own, and the state it returns is moved into new ones
    too, in case the model keeps and fills them later; the leaves are shared, and nothing is copied.
    """
    leaves, spec = tree_flatten(hidden)
    before = [(t, t._version) for t in leaves if isinstance(t, torch.Tensor)]
    try:
        out = call(x, tree_unflatten(leaves, spec))
    except RuntimeError as error:  # autograd refuses in-place changes to a state leaf that collects a gradient
        if "leaf Variable that requires grad is being used in an in-place operation" not in str(error):
            raise
        leaves = [n for n, t in named_leaves(hidden) if isinstance(t, torch.Tensor) and t.requires_grad]
        raise ValueError(_changed_in_place(" or ".join(leaves))) from error
    for i, (t, version) in enumerate(before):
        if t._version != version:
            raise ValueError(_changed_in_place([n for n, leaf in named_leaves(hidden) if isinstance(leaf, torch.Tensor)][i]))
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0], own_containers(out[1])
    return out


def _changed_in_place(name: str) -> str:
    return (
        f"the model changed the state leaf {name} in place (a copy_, add_ or index assignment on the hidden state it "
        "was given): the trainer keeps that tensor for the window, and its gradient would be wrong. Return a new "
        "tensor instead (for example state = state.clone() before updating it)"
    )


class DetachedStateCheck:
    """One warning if the model returns its state without a graph while the window is longer than its chunk.

    ``k2 > k1`` backpropagates a chunk's loss through the state into the steps before the chunk. A model that
    detaches the state it returns (x-transformers' ``detach_mems=True``, its default) stops that gradient at
    every call: each update is then the one of ``k2 = k1``, and ``recompute`` still pays for the longer
    window. A state computed under autograd with a graph has a floating leaf that takes a gradient; the check
    reads that flag on the state the window kept after a chunk, until the first state that tells.

    Args:
        active: whether a window may reach past its chunk (``k2 > k1``, ``ARTBP``, ``AdaptiveK2``).

    >>> check = DetachedStateCheck(active=True)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     check(torch.ones(2, 3), stale=False)
    >>> "k2 > tbtt_step has no effect" in str(caught[0].message), check.pending
    (True, False)
    """

    def __init__(self, active: bool) -> None:
        self.pending = active

    def __call__(self, hidden: Optional[Hidden], stale: bool) -> None:
        """Look at ``hidden``, the state kept after a chunk; ``stale``: it tells nothing, as part of the chunk ran
        without a graph (burn-in or padding for every sample) or the state was kept before the chunk."""
        if not self.pending or stale or not torch.is_grad_enabled():
            return
        floating = [t for t in tree_flatten(hidden)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not floating:
            return
        self.pending = False
        if not any(t.requires_grad for t in floating):
            warnings.warn(
                "k2 > tbtt_step has no effect on this model: the state it returns has no gradient path back to the "
                "state it was given (it is detached inside the model, as x-transformers' detach_mems=True does), so "
                "the gradient stops at every model call: every update backpropagates through its own chunk only, "
                'exactly as with k2 = tbtt_step, and overlap="recompute" still runs the longer window forward. '
                "Return the state with its graph (x-transformers: detach_mems=False) or leave k2 at tbtt_step",
                UserWarning, stacklevel=3,
            )
