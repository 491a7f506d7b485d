"""Real 2-process (gloo, CPU) checks of mmkd.distributed and the gathering loss modules.

One spawn of two workers does all the multi-process work (starting processes that import torch is the
expensive part); each worker writes its results with ``torch.save`` into a tmp dir and the parent
compares them with single-process references on the full batch.
"""

from __future__ import annotations

import datetime
import math
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmkd.distributed import gather_no_grad, gather_with_grad, get_rank_and_world_size, shutdown
from mmkd.losses import CombinedLoss, LossInputs
from mmkd.losses.clip import (
    AffinityDistillationLoss,
    CLIPContrastiveLoss,
    affinity_distillation_loss,
    clip_contrastive_loss,
)

WORLD_SIZE = 2
LOCAL_BATCH = 3
STUDENT_DIM, TEACHER_DIM = 8, 12
TEMPERATURE = 0.05
LOG_SCALE = math.log(20.0)
JOIN_TIMEOUT_S = 90


def full_batch() -> dict[str, torch.Tensor]:
    """The fixed global batch, identical in the parent and in every worker (float64 for 1e-6 checks)."""
    g = torch.Generator().manual_seed(1234)
    n = WORLD_SIZE * LOCAL_BATCH
    return {
        "student_image": torch.randn(n, STUDENT_DIM, generator=g, dtype=torch.float64),
        "student_text": torch.randn(n, STUDENT_DIM, generator=g, dtype=torch.float64),
        "teacher_image": torch.randn(n, TEACHER_DIM, generator=g, dtype=torch.float64),
        "teacher_text": torch.randn(n, TEACHER_DIM, generator=g, dtype=torch.float64),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD_SIZE,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            torch.save(_worker_body(rank), Path(out_dir) / f"rank{rank}.pt")
        finally:
            shutdown()
        (Path(out_dir) / f"rank{rank}.done").write_text("ok")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _worker_body(rank: int) -> dict[str, object]:
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    batch = {k: v[rows].clone() for k, v in full_batch().items()}  # this rank's half
    s_img = batch["student_image"].requires_grad_(True)  # (B_local, Ds), a leaf per rank
    s_txt = batch["student_text"].requires_grad_(True)
    t_img, t_txt = batch["teacher_image"], batch["teacher_text"]
    log_scale = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
    out: dict[str, object] = {"rank_and_world_size": get_rank_and_world_size()}

    contrastive = CLIPContrastiveLoss()
    affinity = AffinityDistillationLoss(temperature=TEMPERATURE)
    combo = CombinedLoss([contrastive, affinity])

    # Both ranks must issue the same collectives in the same order, including the backward all-to-alls.
    c_loss = contrastive(LossInputs(student_image=s_img, student_text=s_txt, logit_scale=log_scale.exp()))[
        "contrastive"
    ]
    out["contrastive"] = c_loss.detach()
    out["contrastive_grads"] = [g.detach() for g in torch.autograd.grad(c_loss, [s_img, s_txt, log_scale])]

    a_loss = affinity(LossInputs(student_image=s_img, student_text=s_txt, teacher_image=t_img, teacher_text=t_txt))[
        "affinity"
    ]
    out["affinity"] = a_loss.detach()
    out["affinity_grads"] = [g.detach() for g in torch.autograd.grad(a_loss, [s_img, s_txt])]

    # open_clip's --local-loss: this rank's rows against the gathered batch; per-rank losses differ, gradients don't.
    local_contrastive = CLIPContrastiveLoss(local_loss=True)
    c_local = local_contrastive(LossInputs(student_image=s_img, student_text=s_txt, logit_scale=log_scale.exp()))[
        "contrastive"
    ]
    out["local_contrastive"] = c_local.detach()
    out["local_contrastive_grads"] = [g.detach() for g in torch.autograd.grad(c_local, [s_img, s_txt, log_scale])]
    local_affinity = AffinityDistillationLoss(temperature=TEMPERATURE, local_loss=True)
    a_local = local_affinity(LossInputs(student_image=s_img, student_text=s_txt, teacher_image=t_img,
                                        teacher_text=t_txt))["affinity"]
    out["local_affinity"] = a_local.detach()
    out["local_affinity_grads"] = [g.detach() for g in torch.autograd.grad(a_local, [s_img, s_txt])]
    out["local_gathered_sizes"] = (local_contrastive.last_gathered_batch_size,
                                   local_affinity.last_gathered_batch_size)

    out["gathered_sizes"] = (
        contrastive.last_gathered_batch_size,
        affinity.last_gathered_batch_size,
        combo.last_gathered_batch_size,
    )

    # Rank order and no-grad variant: rank r contributes rows filled with r.
    marker = torch.full((2, 1), float(rank), requires_grad=True)
    out["ordered"] = gather_with_grad(marker).detach()
    out["no_grad"] = gather_no_grad(marker)
    out["no_grad_requires_grad"] = out["no_grad"].requires_grad

    # Unequal local batch sizes must fail loudly on every rank instead of hanging.
    uneven = torch.zeros(3 if rank == 0 else 2, 4)
    try:
        gather_with_grad(uneven)
        out["uneven_error"] = None
    except ValueError as err:
        out["uneven_error"] = str(err)
    try:
        gather_with_grad(marker, world_size=3)
        out["world_size_error"] = None
    except ValueError as err:
        out["world_size_error"] = str(err)
    return out


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    out_dir = tmp_path_factory.mktemp("dist")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, str(out_dir))) for rank in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
        p.join(5)
    errors = {f.name: f.read_text() for f in sorted(out_dir.glob("*.err"))}
    assert not hung, f"workers did not finish within {JOIN_TIMEOUT_S}s; errors: {errors}"
    done = sorted(f.name for f in out_dir.glob("*.done"))
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}; done {done}; errors: {errors}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def _reference() -> dict[str, object]:
    """Single-process losses and gradients on the full batch."""
    batch = full_batch()
    s_img = batch["student_image"].requires_grad_(True)
    s_txt = batch["student_text"].requires_grad_(True)
    log_scale = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
    c_loss = clip_contrastive_loss(s_img, s_txt, log_scale.exp())
    c_grads = torch.autograd.grad(c_loss, [s_img, s_txt, log_scale])
    a_loss = affinity_distillation_loss(
        s_img, s_txt, batch["teacher_image"], batch["teacher_text"], TEMPERATURE
    )
    a_grads = torch.autograd.grad(a_loss, [s_img, s_txt])
    return {
        "contrastive": c_loss,
        "contrastive_grads": c_grads,
        "affinity": a_loss,
        "affinity_grads": a_grads,
    }


def test_losses_match_single_process_full_batch(worker_results: list[dict[str, object]]) -> None:
    ref = _reference()
    for rank, res in enumerate(worker_results):
        assert res["rank_and_world_size"] == (rank, WORLD_SIZE)
        for name in ("contrastive", "affinity"):
            assert abs(res[name].item() - ref[name].item()) < 1e-6, (rank, name)  # type: ignore[union-attr]


def test_gathered_batch_size_is_world_times_local(worker_results: list[dict[str, object]]) -> None:
    for res in worker_results:
        assert res["gathered_sizes"] == (WORLD_SIZE * LOCAL_BATCH,) * 3


def test_local_gradients_are_world_size_times_full_batch_rows(
    worker_results: list[dict[str, object]],
) -> None:
    # Every rank computes the same full-batch loss L. all_gather's backward sends each rank's
    # dL/d(slice r) to rank r and sums them, so rank r's local embeddings receive
    # world_size * dL/dx_r. DDP then averages parameter gradients over ranks, dividing that factor
    # back out: the update equals single-process training on the full batch.
    # logit_scale is not gathered: each rank gets plain dL/ds, and DDP's average leaves it unchanged.
    ref = _reference()
    for rank, res in enumerate(worker_results):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        c_img, c_txt, c_scale = res["contrastive_grads"]  # type: ignore[misc]
        torch.testing.assert_close(
            c_img, WORLD_SIZE * ref["contrastive_grads"][0][rows], atol=1e-9, rtol=1e-7
        )
        torch.testing.assert_close(
            c_txt, WORLD_SIZE * ref["contrastive_grads"][1][rows], atol=1e-9, rtol=1e-7
        )
        torch.testing.assert_close(c_scale, ref["contrastive_grads"][2], atol=1e-9, rtol=1e-7)
        a_img, a_txt = res["affinity_grads"]  # type: ignore[misc]
        torch.testing.assert_close(a_img, WORLD_SIZE * ref["affinity_grads"][0][rows], atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(a_txt, WORLD_SIZE * ref["affinity_grads"][1][rows], atol=1e-9, rtol=1e-7)


def test_local_loss_gives_the_global_gradients(worker_results: list[dict[str, object]]) -> None:
    """local_loss: each rank's loss covers its own rows (so the ranks' losses differ and average to the global one),
    and every gradient DDP would apply equals the global loss's to 1e-6: the embeddings' per rank, logit_scale's
    after DDP's average over ranks."""
    ref = _reference()
    for name in ("contrastive", "affinity"):
        per_rank = [res[f"local_{name}"].item() for res in worker_results]  # type: ignore[union-attr]
        assert abs(per_rank[0] - per_rank[1]) > 1e-3, (name, per_rank)  # really local
        assert abs(sum(per_rank) / WORLD_SIZE - ref[name].item()) < 1e-6, name  # type: ignore[union-attr]
    for rank, res in enumerate(worker_results):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        assert res["local_gathered_sizes"] == (WORLD_SIZE * LOCAL_BATCH,) * 2
        for name, today in (("contrastive", res["contrastive_grads"]), ("affinity", res["affinity_grads"])):
            local = res[f"local_{name}_grads"]
            for tower in (0, 1):
                torch.testing.assert_close(local[tower], today[tower], atol=1e-6, rtol=0)  # type: ignore[index]
                torch.testing.assert_close(local[tower], WORLD_SIZE * ref[f"{name}_grads"][tower][rows],
                                           atol=1e-6, rtol=0)
    scale = sum(res["local_contrastive_grads"][2] for res in worker_results) / WORLD_SIZE  # type: ignore[index]
    torch.testing.assert_close(scale, ref["contrastive_grads"][2], atol=1e-6, rtol=0)


def test_gather_rank_order_no_grad_and_errors(worker_results: list[dict[str, object]]) -> None:
    expected = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    for res in worker_results:
        torch.testing.assert_close(res["ordered"], expected)
        torch.testing.assert_close(res["no_grad"], expected)
        assert res["no_grad_requires_grad"] is False
        # both ranks raise, and the message names every rank's shape
        assert "[(3, 4), (2, 4)]" in str(res["uneven_error"])
        assert "world_size=3" in str(res["world_size_error"])


def test_not_initialised_is_identity() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    assert get_rank_and_world_size() == (0, 1)
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    assert gather_with_grad(x, rank=0, world_size=1) is x
    detached = gather_no_grad(x)
    assert torch.equal(detached, x) and not detached.requires_grad
    with pytest.raises(ValueError, match="world_size=2"):
        gather_with_grad(x, world_size=2)
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        gather_no_grad(x, world_size=0)


def test_a_stock_clip_model_is_made_acceptable_to_fsdp2_and_saved_back_as_stock():
    """prepare_for_sharding: CLIPModel's 0-d logit_scale (refused by fully_shard) becomes 1-d and its
    get_input_embeddings() (NotImplementedError in transformers) answers; outputs unchanged; restore_scalars gives
    back the state dict a stock CLIPModel loads."""
    from transformers import CLIPModel

    from mmkd.distributed import prepare_for_sharding, restore_scalars
    from tests.conftest import tiny_clip_config

    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config()).eval()
    with pytest.raises(NotImplementedError):
        model.get_input_embeddings()
    inputs = {"input_ids": torch.randint(0, 99, (2, 7)), "pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        before = model(**inputs).logits_per_image
    original = {k: v.clone() for k, v in model.state_dict().items()}

    assert prepare_for_sharding(model) == ["logit_scale"]
    assert model.logit_scale.shape == (1,) and model.logit_scale.requires_grad
    assert all(p.ndim > 0 for p in model.parameters())
    assert model.get_input_embeddings() is model.text_model.embeddings.token_embedding
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits_per_image, before, rtol=0, atol=0)

    restored = restore_scalars(model.state_dict(), ["logit_scale"])
    assert {k: v.shape for k, v in restored.items()} == {k: v.shape for k, v in original.items()}
    fresh = CLIPModel(tiny_clip_config())
    fresh.load_state_dict(restored)  # strict: a stock CLIPModel takes it
    assert torch.equal(fresh.logit_scale, original["logit_scale"])
