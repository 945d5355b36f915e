import numpy as np
import pytest
import torch

from esmm.batch import Batch
from esmm.config import ModelConfig
from esmm.features import FeatureLayout
from esmm.losses import esmm_loss
from esmm.methods import METHODS, build_model, get_method
from esmm.model import (ESMM, MODEL_KINDS, FieldEmbedding, Logits, SingleTask, Tower, build_network, dense_parameters,
                        probs, sparse_parameters)

# 3 fields: "a" 1 slot (ids 0..3), "b" 2 slots (ids 4..6), "c" 3 slots (ids 7..11); L = 6, 12 embeddings.
LAYOUT = FeatureLayout(fields=("a", "b", "c"), buckets=(4, 3, 5), max_len=(1, 2, 3))
TINY = ModelConfig(embedding_dim=4, hidden=(16, 8))


def _random_batch(n: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(o, o + b, (n,), generator=g)
                       for o, b, k in zip(LAYOUT.offsets, LAYOUT.buckets, LAYOUT.max_len) for _ in range(k)], 1)
    click = (torch.rand(n, generator=g) < 0.5).float()
    return Batch(ids=ids, wts=torch.rand(n, LAYOUT.num_slots, generator=g), click=click,
                 conversion=click * (torch.rand(n, generator=g) < 0.5).float())


def test_layout_of_the_tiny_fixture():
    assert LAYOUT.offsets == (0, 4, 7) and LAYOUT.slot_starts == (0, 1, 3)
    assert LAYOUT.num_slots == 6 and LAYOUT.num_embeddings == 12


def test_field_embedding_is_the_weighted_sum_per_field():
    emb = FieldEmbedding(LAYOUT, dim=2)
    with torch.no_grad():
        emb.bag.weight.copy_(torch.arange(24, dtype=torch.float32).view(12, 2))  # row i = [2i, 2i+1]
    ids = torch.tensor([[2, 5, 6, 8, 10, 7],     # a=2; b: 5 (.25) 6 (.75); c: 8 (.5) 10 (.5) pad 7 (0)
                        [0, 4, 4, 11, 9, 7]])    # a missing (bucket 0, weight 1); b: 4 (1) pad; c: 11 9 7
    wts = torch.tensor([[1.0, 0.25, 0.75, 0.5, 0.5, 0.0],
                        [1.0, 1.0, 0.0, 0.2, 0.3, 0.5]])
    out = emb(ids, wts)
    expected = torch.tensor([[4, 5, 11.5, 12.5, 18, 19],
                             # c: .2*[22,23] + .3*[18,19] + .5*[14,15]
                             [0, 1, 8, 9, 16.8, 17.8]])
    assert out.shape == (2, 6)
    torch.testing.assert_close(out, expected)


def test_embedding_init_is_small():
    w = FieldEmbedding(LAYOUT, dim=8).bag.weight
    assert w.abs().max() < 0.1 and w.std() > 0.001


def test_tower_and_model_shapes():
    b = _random_batch(5)
    assert Tower(7, (3, 2))(torch.randn(5, 7)).shape == (5,)
    assert len([m for m in Tower(7, (3, 2)).modules() if isinstance(m, torch.nn.Linear)]) == 3
    out = ESMM(LAYOUT, TINY)(b.ids, b.wts)
    assert isinstance(out, Logits) and out.ctr.shape == (5,) and out.cvr.shape == (5,)
    assert SingleTask(LAYOUT, TINY)(b.ids, b.wts).shape == (5,)


def test_probs_ctcvr_is_the_product():
    logits = Logits(ctr=torch.tensor([0.0, 2.0, -3.0]), cvr=torch.tensor([0.0, -1.0, 4.0]))
    p_ctr, p_cvr, p_ctcvr = probs(logits)
    torch.testing.assert_close(p_ctr[0], torch.tensor(0.5))
    torch.testing.assert_close(p_ctcvr, torch.sigmoid(logits.ctr) * torch.sigmoid(logits.cvr))
    torch.testing.assert_close(p_ctcvr[0], torch.tensor(0.25))


def test_shared_vs_separate_embeddings_parameter_counts():
    n = lambda m: sum(p.numel() for p in m.parameters())
    shared, separate = ESMM(LAYOUT, TINY, shared=True), ESMM(LAYOUT, TINY, shared=False)
    table = LAYOUT.num_embeddings * TINY.embedding_dim
    assert n(separate) - n(shared) == table
    assert sum(p.numel() for p in sparse_parameters(shared)) == table
    assert sum(p.numel() for p in sparse_parameters(separate)) == 2 * table
    # towers: (3*4 -> 16 -> 8 -> 1) twice
    tower = (12 * 16 + 16) + (16 * 8 + 8) + (8 + 1)
    assert sum(p.numel() for p in dense_parameters(shared)) == 2 * tower
    assert n(SingleTask(LAYOUT, TINY)) == table + tower


def test_esmm_ns_towers_see_different_features():
    m = ESMM(LAYOUT, TINY, shared=False)
    with torch.no_grad():
        m.cvr_embedding.bag.weight.zero_()
    b = _random_batch(4)
    x_cvr = m.cvr_embedding(b.ids, b.wts)
    assert torch.all(x_cvr == 0) and not torch.all(m.embedding(b.ids, b.wts) == 0)


def test_parameter_groups_partition_the_model_and_embedding_grads_are_sparse():
    m = ESMM(LAYOUT, TINY)
    sparse, dense = sparse_parameters(m), dense_parameters(m)
    assert {id(p) for p in sparse} | {id(p) for p in dense} == {id(p) for p in m.parameters()}
    assert not {id(p) for p in sparse} & {id(p) for p in dense}
    b = _random_batch(6)
    out = m(b.ids, b.wts)
    esmm_loss(out.ctr, out.cvr, b.click, b.conversion).total.backward()
    assert all(p.grad.is_sparse for p in sparse)
    assert all(p.grad is not None and not p.grad.is_sparse for p in dense)


@pytest.mark.parametrize("method", METHODS)
def test_build_model_per_method(method):
    m = build_model(method, LAYOUT, TINY)
    kind = get_method(method).network
    assert kind in MODEL_KINDS and type(m) is type(build_network(kind, LAYOUT, TINY))
    if kind == "single":
        assert isinstance(m, SingleTask)
    elif kind in ("esmm", "esmm_ns"):
        assert isinstance(m, ESMM) and m.shared == (kind == "esmm")
    # every network runs on an empty batch and on a batch, and its embedding gradients are sparse
    for n in (0, 5):
        b = _random_batch(n)
        out = m(b.ids, b.wts)
        first = out if isinstance(out, torch.Tensor) else out[0]
        assert first.shape == (n,)
    sum(o.sum() for o in ([out] if isinstance(out, torch.Tensor) else list(out))).backward()
    assert all(p.grad is None or p.grad.is_sparse for p in sparse_parameters(m))


def test_empty_batch_runs_and_gives_zero_loss():
    m = ESMM(LAYOUT, TINY)
    b = _random_batch(0)
    out = m(b.ids, b.wts)
    assert out.ctr.shape == (0,)
    loss = esmm_loss(out.ctr, out.cvr, b.click, b.conversion).total
    loss.backward()
    assert loss.item() == 0.0


@pytest.fixture
def one_thread():
    # A tiny model: thread hand-offs would cost more than the maths (and contend with other test processes).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_esmm_training_lowers_the_loss_on_a_separable_problem(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = 512
    b = _random_batch(n)
    bucket_a, bucket_c = b.ids[:, 0], b.ids[:, 3] - 7
    click = (bucket_a >= 2).float()                     # click decided by field a
    conversion = click * (bucket_c >= 3).float()        # conversion (given click) decided by field c
    first_slots = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])   # pool only the slots that decide the labels
    b = Batch(ids=b.ids, wts=first_slots.expand(n, -1), click=click, conversion=conversion)
    model = ESMM(LAYOUT, TINY)
    opt_sparse = torch.optim.SparseAdam(sparse_parameters(model), lr=0.05)
    opt_dense = torch.optim.Adam(dense_parameters(model), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    losses = []
    for _ in range(80):
        idx = torch.randint(0, n, (64,), generator=g)
        mb = b.select(idx)
        out = model(mb.ids, mb.wts)
        loss = esmm_loss(out.ctr, out.cvr, mb.click, mb.conversion).total
        opt_sparse.zero_grad()
        opt_dense.zero_grad()
        loss.backward()
        opt_sparse.step()
        opt_dense.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10])
    with torch.no_grad():
        p_ctr, p_cvr, _ = probs(model(b.ids, b.wts))
    clicked = click > 0
    assert ((p_ctr > 0.5).float() == click).float().mean() > 0.95
    assert ((p_cvr[clicked] > 0.5).float() == conversion[clicked]).float().mean() > 0.9


# --------------------------------------------------------------------------------------------- Batch

def test_batch_from_numpy_shares_memory_and_converts():
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    wts = np.ones((2, 6), dtype=np.float32)
    b = Batch.from_numpy(ids, wts, np.array([1, 0], dtype=np.int32), np.array([1, 0], dtype=np.int32),
                         sample_id=np.array([7, 8], dtype=np.int64))
    ids[0, 0] = 99
    wts[1, 1] = 0.5
    assert b.ids[0, 0].item() == 99 and b.wts[1, 1].item() == 0.5  # zero-copy
    assert b.ids.dtype == torch.int64 and b.wts.dtype == torch.float32
    assert b.click.dtype == torch.float32 and b.click.tolist() == [1.0, 0.0]
    assert b.weight.tolist() == [1.0, 1.0] and len(b) == 2
    b32 = Batch.from_numpy(ids.astype(np.int32), wts, np.zeros(2), np.zeros(2))
    assert b32.ids.dtype == torch.int64 and b32.sample_id is None
    ro = ids.copy()
    ro.setflags(write=False)
    assert Batch.from_numpy(ro, wts, np.zeros(2), np.zeros(2)).ids[0, 0].item() == 99
    rows = np.empty(2, dtype=object)
    rows[0], rows[1] = ids[0], ids[1]
    assert Batch.from_numpy(rows, wts, np.zeros(2), np.zeros(2)).ids.shape == (2, 6)


def test_batch_select_cat_and_to():
    b = _random_batch(5)
    b.sample_id = torch.arange(5) * 10
    s = b.select(torch.tensor([True, False, True, False, False]))
    assert s.sample_id.tolist() == [0, 20] and s.ids.shape == (2, 6) and s.weight.shape == (2,)
    r = b.select(torch.tensor([4, 4, 1]))
    assert r.sample_id.tolist() == [40, 40, 10]
    torch.testing.assert_close(r.wts[0], b.wts[4])
    c = Batch.cat([s, r])
    assert c.sample_id.tolist() == [0, 20, 40, 40, 10] and len(c) == 5
    assert Batch.cat([s, _random_batch(2)]).sample_id is None
    moved = b.to("cpu")
    assert moved.ids.device.type == "cpu" and torch.equal(moved.ids, b.ids)


def test_the_one_head_by_hand_eager_and_scripted():
    """esmm.model.head, the only place logits become (p_ctr, p_cvr, p_ctcvr): ESMM's product, AITM's clipped ratio,
    a single logit in its slot with NaN elsewhere; TorchScript gives the same numbers."""
    import math

    from esmm.model import HEAD_KIND_PRODUCT, HEAD_KIND_SINGLE, HEAD_KIND_STEPS, head
    lg = lambda p: math.log(p / (1 - p))  # noqa: E731
    a = torch.tensor([lg(0.5), lg(0.2), lg(0.8)])
    b = torch.tensor([lg(0.25), lg(0.3), lg(0.4)])
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.*")
        scripted = torch.jit.script(head)   # what the portable export compiles
    for fn in (head, scripted):
        p_ctr, p_cvr, p_ctcvr = fn(a, b, HEAD_KIND_PRODUCT, -1)
        assert torch.allclose(p_ctcvr, torch.tensor([0.125, 0.06, 0.32]), atol=1e-6)
        p_ctr, p_cvr, p_ctcvr = fn(a, b, HEAD_KIND_STEPS, -1)    # pCTCVR .25/.5, .3/.2 (clipped), .4/.8
        assert torch.allclose(p_cvr, torch.tensor([0.5, 1.0, 0.5]), atol=1e-6)
        assert torch.allclose(p_ctcvr, torch.tensor([0.25, 0.2, 0.4]), atol=1e-6)
        for slot in (0, 1, 2):
            out = fn(a, None, HEAD_KIND_SINGLE, slot)
            assert torch.allclose(out[slot], torch.sigmoid(a))
            assert all(torch.isnan(out[k]).all() for k in range(3) if k != slot)
