"""Cross-process gathering of embedding batches for batch-level losses.

Contrastive (CLIP) and affinity (CLIP-KD) losses compare every image with every caption in the
batch, so under data parallelism they must see the *global* batch: each rank gathers all ranks'
embeddings, computes the loss on the full ``(world_size * B, D)`` batch, and lets gradients flow
back only into its own local slice. This is the ``gather_with_grad=True, local_loss=False`` set-up
of open_clip's ``ClipLoss``.

Gradient scale: every rank computes the *same* full-batch loss ``L``. The backward of the gather
(an all_reduce of the gathered gradient, then this rank's slice) sums, over all ranks, the gradient each
rank's copy of ``L`` sends to a slice, so rank ``r`` receives ``world_size * dL/dx_r`` for its local embeddings
``x_r``. DDP (and Accelerate, which wraps it) then *averages* parameter gradients over ranks, which
cancels the factor exactly: the parameter update equals the single-process full-batch gradient.

All helpers assume every rank holds a tensor of the same shape (equal local batch sizes: use
``drop_last=True`` or Accelerate's default ``even_batches=True``). The shapes are all-gathered first,
a few integers per call, so a mismatch raises a clear ``ValueError`` on every rank instead of hanging
or silently mis-assigning rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "expose_input_embeddings",
    "gather_no_grad",
    "gather_with_grad",
    "get_rank_and_world_size",
    "local_rows",
    "prepare_for_sharding",
    "restore_scalars",
]


def get_rank_and_world_size() -> tuple[int, int]:
    """Return ``(rank, world_size)`` of the default process group, or ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rows(batch_size: int) -> slice | None:
    """This rank's rows of a batch gathered from ``batch_size`` rows per rank (``None`` when not distributed): what a
    local loss computes against the whole gathered batch."""
    rank, world_size = get_rank_and_world_size()
    return None if world_size == 1 else slice(rank * batch_size, (rank + 1) * batch_size)


def _resolve(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fill in ``rank``/``world_size`` from the process group and check explicit values against it.

    Explicit values exist for parity with open_clip's ``gather_features(..., rank, world_size)``; the
    collective itself always spans the default group, so a disagreeing value is a caller bug.
    ``world_size=1`` is always honoured (it means "do not gather").
    """
    actual_rank, actual_world_size = get_rank_and_world_size()
    world_size = actual_world_size if world_size is None else world_size
    rank = actual_rank if rank is None else rank
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size == 1:
        return 0, 1
    if actual_world_size == 1:
        raise ValueError(
            f"world_size={world_size} was requested but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group or launch with accelerate/torchrun)"
        )
    if world_size != actual_world_size:
        raise ValueError(
            f"world_size={world_size} does not match the process group's world size {actual_world_size}"
        )
    if rank != actual_rank:
        raise ValueError(f"rank={rank} does not match this process's rank {actual_rank}")
    return rank, world_size


def _check_equal_shapes(tensor: Tensor, world_size: int) -> None:
    """All-gather every rank's shape and raise the same ValueError on all ranks if they differ."""
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)  # (ndim,)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]  # world_size x (ndim,)
    dist.all_gather(shapes, shape)
    per_rank = [tuple(s.tolist()) for s in shapes]
    if any(s != per_rank[0] for s in per_rank):
        raise ValueError(
            "gather requires the same tensor shape (equal local batch sizes) on every rank, got "
            f"{per_rank} in rank order; use drop_last=True or Accelerate's even_batches=True"
        )


def gather_with_grad(tensor: Tensor, rank: int | None = None, world_size: int | None = None) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order, keeping the autograd graph.

    Args:
        tensor: local ``(B, ...)`` tensor; every rank must pass the same shape (equal local batch
            sizes), otherwise a ``ValueError`` listing the per-rank shapes is raised on all ranks.
        rank, world_size: optional; default to the process group's. ``world_size=1`` returns
            ``tensor`` itself (no copy, no communication), which is also what happens when
            torch.distributed is not initialised.

    Returns:
        ``(world_size * B, ...)``. Rows ``rank * B:(rank + 1) * B`` are this rank's ``tensor``.
        Backward sums, over ranks, the gradients flowing into this rank's slice (see the module
        docstring for why that makes DDP's averaged gradient equal the full-batch gradient).
    """
    rank, world_size = _resolve(rank, world_size)
    if world_size == 1:
        return tensor
    _check_equal_shapes(tensor, world_size)
    return _GatherWithGrad.apply(tensor, rank, world_size)  # (world_size * B, ...)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient for this rank's rows (all_reduce, then slice).

    Written out rather than using ``torch.distributed.nn.functional.all_gather``: that one is deprecated in recent
    torch and, on gloo, left processes aborting at exit ("terminate called without an active exception") in about
    one 2-process run in four here; this version uses only the plain collectives.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, rank: int, world_size: int) -> Tensor:
        ctx.rank, ctx.batch = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss depends on every row
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch], None, None


def gather_no_grad(tensor: Tensor, rank: int | None = None, world_size: int | None = None) -> Tensor:
    """Like :func:`gather_with_grad` but detached: for teacher embeddings, logging and metrics.

    Returns ``tensor.detach()`` when ``world_size == 1`` so callers get the same no-grad contract
    whether or not they run distributed.
    """
    rank, world_size = _resolve(rank, world_size)
    if world_size == 1:
        return tensor.detach()
    _check_equal_shapes(tensor, world_size)
    with torch.no_grad():
        local = tensor.detach().contiguous()  # (B, ...); collectives need contiguous buffers
        parts = [torch.empty_like(local) for _ in range(world_size)]  # world_size x (B, ...)
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=0)  # (world_size * B, ...)


def shutdown() -> None:
    """End the process group cleanly: a barrier, then ``destroy_process_group``; a no-op outside a launch.

    Without the barrier one rank can tear gloo down while its peer is still in a collective, and a process that
    exits with the group alive can abort in gloo's threads ("terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _text_token_embedding(model: torch.nn.Module) -> torch.nn.Module:
    return model.text_model.embeddings.token_embedding


def expose_input_embeddings(model: torch.nn.Module) -> None:
    """Give a two-tower ``CLIPModel`` the ``get_input_embeddings()`` accelerate's FSDP2 wrapping asks for.

    ``accelerate``'s ``fsdp2_prepare_model`` shards the input embedding as its own unit and calls
    ``model.get_input_embeddings()`` to find it; transformers' ``CLIPModel`` raises ``NotImplementedError`` there (it
    has two towers), so FSDP2 training of a stock ``CLIPModel`` fails at ``prepare`` without this. The answer is the
    text tower's token embedding — what ``CLIPTextModel.get_input_embeddings()`` returns. Only this instance is
    changed (nothing is saved with it); a model that answers already is left alone.
    """
    import types

    if not hasattr(model, "get_input_embeddings"):
        return  # not a transformers model: accelerate's getattr default applies
    try:
        model.get_input_embeddings()
    except NotImplementedError:
        if getattr(getattr(model, "text_model", None), "embeddings", None) is None:
            raise
        model.get_input_embeddings = types.MethodType(_text_token_embedding, model)


def prepare_for_sharding(model: torch.nn.Module) -> list[str]:
    """Make a stock ``CLIPModel`` acceptable to FSDP2 (``torch.distributed.fsdp.fully_shard``, as accelerate wraps
    it) and to DeepSpeed.

    Both fail on 0-d parameters, and ``CLIPModel.logit_scale`` is one: FSDP2 refuses them ("fully_shard doesn't
    support scalar parameters"), DeepSpeed 0.19's engine crashes broadcasting them ("self.dim() cannot be 0 to view
    Float as Byte"). Every 0-d parameter becomes a 1-element 1-d one (``logit_scale.exp()`` broadcasts the same in
    the loss and in ``CLIPModel.forward``), and :func:`restore_scalars` turns them back in the state dict that is
    saved, so the saved folder is a stock ``CLIPModel``. Also :func:`expose_input_embeddings`. Returns the reshaped
    names; call it before the optimizer is created.
    """
    expose_input_embeddings(model)
    reshaped = []
    for name, param in list(model.named_parameters()):
        if param.ndim == 0:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            setattr(module, leaf, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            reshaped.append(name)
    return reshaped


def restore_scalars(state_dict: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """Undo :func:`prepare_for_sharding`'s reshaping in a (full) state dict about to be saved."""
    for name in names:
        if name in state_dict and state_dict[name].shape == (1,):
            state_dict[name] = state_dict[name].reshape(())
    return state_dict
