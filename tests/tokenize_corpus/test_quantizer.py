"""Invariants of the unit-norm EMA quantiser: EMA formula, lookup, rank sync, dead-code restart."""

import threading

import torch
import torch.nn.functional as F

from tokenize_corpus.quantizer import NormEMAQuantizer


def _clustered(n: int, dim: int, centres: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=gen)
    pick = torch.randint(0, centres, (n,), generator=gen)
    return means[pick] + 0.1 * torch.randn(n, dim, generator=gen)  # [n, dim]


def test_codebook_stays_unit_norm_through_kmeans_and_ema():
    q = NormEMAQuantizer(codebook_size=16, code_dim=8, kmeans_iters=5).train()
    for step in range(5):
        q(_clustered(64, 8, 6, seed=step))
        norms = q.codebook.norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert q.embedding.initted.item() == 1.0


def test_ema_update_matches_hand_computation():
    q = NormEMAQuantizer(codebook_size=2, code_dim=2, decay=0.99, kmeans_iters=0).train()
    q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    z = torch.tensor([[0.8, 0.6], [2.0, 0.0]])  # both nearer code 0; code 1 unused
    _, tokens, _ = q(z)
    assert tokens.tolist() == [0, 0]
    mean = F.normalize((torch.tensor([0.8, 0.6]) + torch.tensor([1.0, 0.0])) / 2, dim=0)
    expected0 = F.normalize(0.99 * torch.tensor([1.0, 0.0]) + 0.01 * mean, dim=0)
    assert torch.allclose(q.codebook[0], expected0, atol=1e-6)
    assert torch.equal(q.codebook[1], torch.tensor([0.0, 1.0]))  # unused code unchanged
    assert torch.allclose(q.cluster_size, torch.tensor([0.02, 0.0]))
    assert q.unused_steps.tolist() == [0, 1]


def test_tokens_are_argmax_cosine_and_eval_does_not_update():
    q = NormEMAQuantizer(codebook_size=16, code_dim=8, kmeans_iters=0).eval()
    before = q.codebook.clone()
    z = torch.randn(4, 10, 8)
    quantized, tokens, loss = q(z)
    assert tokens.shape == (4, 10) and tokens.dtype == torch.int64
    cos = F.normalize(z, dim=-1) @ q.codebook.t()  # [4, 10, 16]
    assert torch.equal(tokens, cos.argmax(dim=-1))
    assert torch.allclose(quantized, q.codebook[tokens])
    assert torch.equal(q.codebook, before)
    expected = F.mse_loss(q.codebook[tokens], F.normalize(z, dim=-1))
    assert torch.allclose(loss, expected)


def test_straight_through_gradient():
    q = NormEMAQuantizer(codebook_size=16, code_dim=8, kmeans_iters=0).train()
    z = torch.randn(5, 8, requires_grad=True)
    quantized, _, loss = q(z)
    (quantized.sum() + loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


class _TwoRanks:
    """Simulates an in-place SUM all_reduce between two threads (ranks 0 and 1)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=30)
        self.slots: list[torch.Tensor | None] = [None, None]

    def all_reduce_for(self, rank: int):
        def all_reduce(x: torch.Tensor) -> None:
            self.slots[rank] = x.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]  # same order on both ranks: same bits
            self.barrier.wait()
            x.copy_(total)

        return all_reduce


def _run_two_ranks(sync: bool, dead_code_steps: int) -> list[NormEMAQuantizer]:
    group = _TwoRanks()
    quantizers = []
    for rank in range(2):
        all_reduce = group.all_reduce_for(rank) if sync else None
        q = NormEMAQuantizer(
            16, 8, kmeans_iters=5, dead_code_steps=dead_code_steps, all_reduce=all_reduce, rank=rank
        ).train()
        quantizers.append(q)
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            for step in range(6):  # each rank sees different data
                quantizers[rank](_clustered(48, 8, 5, seed=100 * rank + step))
        except BaseException as err:  # surfaced in the main thread
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return quantizers


def test_kmeans_and_ema_are_synchronised_across_ranks():
    q0, q1 = _run_two_ranks(sync=True, dead_code_steps=2)
    assert torch.equal(q0.codebook, q1.codebook)
    assert torch.equal(q0.cluster_size, q1.cluster_size)
    assert torch.equal(q0.unused_steps, q1.unused_steps)
    # Without the all_reduce the ranks drift apart (the reference's flaw).
    u0, u1 = _run_two_ranks(sync=False, dead_code_steps=2)
    assert not torch.equal(u0.codebook, u1.codebook)


def test_dead_codes_are_restarted_from_encoder_outputs():
    dim = 8
    data = _clustered(64, dim, 4, seed=0).abs()  # all in the positive orthant
    alive = F.normalize(torch.rand(8, dim) + 0.1, dim=-1)
    dead = -alive  # pointing away from every data vector: never the nearest code
    for steps, expect_restart in ((2, True), (0, False)):
        q = NormEMAQuantizer(16, dim, kmeans_iters=0, dead_code_steps=steps).train()
        q.embedding.weight.copy_(torch.cat([alive, dead]))
        q(data)
        q(data)
        restarted = q.codebook[8:]
        if expect_restart:
            assert (restarted > 0).all(), "restarted codes should lie among the data"
            assert q.unused_steps[8:].eq(0).all()
            fits = F.normalize(data, dim=-1) @ restarted.t()  # [64, 8]
            assert torch.allclose(fits.max(dim=0).values, torch.ones(8), atol=1e-5)
            _, tokens, _ = q.eval()(data)
            assert (tokens >= 8).any(), "revived codes should now be used"
        else:
            assert torch.equal(restarted, dead)
            assert q.unused_steps[8:].eq(2).all()
