"""Unit-norm vector quantiser with an EMA codebook (VQ-KD, docs/method.md §1).

The codebook lives on the unit sphere: encoder outputs are l2-normalised and matched to the
nearest code (the same as the highest cosine similarity). In training mode every call updates the
codebook by an exponential moving average of the vectors assigned to each code, then
re-normalises it, as the official ``NormEMAVectorQuantizer`` does.

Multi-process training: the counts and sums behind every update (EMA, k-means initialisation and
dead-code restart) go through an injected ``all_reduce`` (in-place sum, e.g.
``torch.distributed.all_reduce``) so every rank computes the same codebook. The reference runs
k-means on each GPU's own first batch, so its ranks start from different codebooks; here rank 0
picks the k-means seeds, they are shared by a sum in which the other ranks contribute zeros, and
the k-means statistics are summed over ranks. This file never calls ``torch.distributed`` itself.

Parameter and buffer names follow the official checkpoint layout: ``embedding.weight``,
``embedding.cluster_size``, ``embedding.embed_avg``, ``embedding.initted`` and ``cluster_size``.
The only extra is ``unused_steps`` (dead-code bookkeeping), which :func:`save_tokenizer` leaves out
of released files.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

AllReduce = Callable[[torch.Tensor], object]


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1)


def _squared_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared l2 distances [M, K], computed in the reference's operation order.

    Keeping the exact formula (|z|^2 + |w|^2 - 2 z.w) makes tokens bit-identical to the official
    tokenizer on the same hardware, near-ties included.
    """
    return (
        z.pow(2).sum(dim=1, keepdim=True)
        + codebook.pow(2).sum(dim=1)
        - 2 * torch.einsum("bd,nd->bn", z, codebook)
    )


class CodebookEMA(nn.Module):
    """Holds the codebook and the official EMA buffers (names match ``quantize.embedding.*``).

    ``cluster_size`` and ``embed_avg`` are kept only so released checkpoints load and saved files
    keep the official layout; the official update does not use them either.
    """

    def __init__(self, codebook_size: int, code_dim: int, kmeans_init: bool) -> None:
        super().__init__()
        if kmeans_init:
            weight = torch.zeros(codebook_size, code_dim)
        else:
            weight = _l2norm(torch.randn(codebook_size, code_dim))
        self.register_buffer("weight", weight)  # [K, D], unit rows once initialised
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_avg", weight.clone())
        # float [1] like the reference (torch.Tensor([bool]))
        self.register_buffer("initted", torch.tensor([0.0 if kmeans_init else 1.0]))


class NormEMAQuantizer(nn.Module):
    """Nearest-code lookup on the unit sphere with EMA codebook updates.

    Call ``quantized, tokens, commit_loss = quantizer(z)`` with ``z`` of shape ``[..., D]``.
    ``quantized`` has the shape of ``z`` and carries a straight-through gradient to ``z``;
    ``tokens`` is ``z.shape[:-1]`` int64; ``commit_loss`` is MSE(sg[quantized], normalised z).
    In training mode the call also initialises the codebook by k-means on the first batch (when
    ``kmeans_iters > 0``), applies the EMA update and restarts dead codes.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        decay: float = 0.99,
        kmeans_iters: int = 10,
        dead_code_steps: int = 0,
        all_reduce: AllReduce | None = None,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.decay = decay
        self.kmeans_iters = kmeans_iters
        self.dead_code_steps = dead_code_steps
        self.embedding = CodebookEMA(codebook_size, code_dim, kmeans_init=kmeans_iters > 0)
        # EMA of per-step assignment counts (all ranks): the official usage statistic.
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        # Consecutive training steps without any assignment, per code (dead-code restart).
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
        self.all_reduce = all_reduce
        self.rank = rank

    @property
    def codebook(self) -> torch.Tensor:
        """The codebook ``[K, D]`` (unit rows)."""
        return self.embedding.weight

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.all_reduce is not None:
            self.all_reduce(x)
        return x

    def _from_rank0(self, x: torch.Tensor) -> torch.Tensor:
        """Broadcast with a sum: every rank but 0 contributes zeros."""
        if self.all_reduce is None:
            return x
        if self.rank != 0:
            x = torch.zeros_like(x)
        self.all_reduce(x)
        return x

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Tokens ``[M]`` for l2-normalised vectors ``z`` ``[M, D]``: the nearest code."""
        return _squared_distances(z, self.embedding.weight).argmin(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise ``z`` ``[..., D]``; see the class docstring for the outputs."""
        shape = z.shape
        z = _l2norm(z.float())
        flat = z.reshape(-1, self.code_dim)  # [M, D]
        if self.training and not bool(self.embedding.initted.item()):
            self._kmeans_init(flat.detach())
        tokens = self.lookup(flat)  # [M]
        quantized = F.embedding(tokens, self.embedding.weight).view(z.shape)
        if self.training:
            self._ema_update(flat.detach(), tokens)
        commit_loss = F.mse_loss(quantized.detach(), z)
        # Straight-through: the decoder sees the code, the encoder gets its gradient.
        quantized = z + (quantized - z).detach()
        return quantized, tokens.view(shape[:-1]), commit_loss

    @torch.no_grad()
    def _kmeans_init(self, samples: torch.Tensor) -> None:
        """Cosine k-means on the first batch, statistics summed across ranks (identical result)."""
        num, dim = samples.shape
        k = self.codebook_size
        # A fixed private generator: the seeds do not depend on (or disturb) the global RNG.
        gen = torch.Generator().manual_seed(0)
        if num >= k:
            pick = torch.randperm(num, generator=gen)[:k]
        else:
            pick = torch.randint(0, num, (k,), generator=gen)
        means = self._from_rank0(samples[pick.to(samples.device)].clone())  # [K, D]
        bins = torch.zeros(k, device=samples.device)
        for _ in range(self.kmeans_iters):
            assign = (samples @ means.t()).argmax(dim=-1)  # [num]
            bins = self._sum(torch.bincount(assign, minlength=k).float())  # [K]
            sums = torch.zeros(k, dim, device=samples.device, dtype=samples.dtype)
            sums = self._sum(sums.index_add_(0, assign, samples))  # [K, D]
            empty = bins == 0
            new_means = _l2norm(sums / bins.clamp(min=1)[:, None])
            means = torch.where(empty[:, None], means, new_means)
        self.embedding.weight.copy_(means)
        self.embedding.cluster_size.copy_(bins)
        self.embedding.initted.fill_(1.0)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, tokens: torch.Tensor) -> None:
        """w <- norm(decay * w + (1 - decay) * norm(mean of assigned)); unused codes unchanged."""
        k = self.codebook_size
        bins = self._sum(torch.bincount(tokens, minlength=k).float())  # [K]
        self.cluster_size.mul_(self.decay).add_(bins, alpha=1 - self.decay)
        sums = torch.zeros(k, self.code_dim, device=flat.device, dtype=flat.dtype)
        sums = self._sum(sums.index_add_(0, tokens, flat))  # [K, D]
        used = bins > 0
        means = _l2norm(sums / bins.clamp(min=1)[:, None])
        weight = self.embedding.weight
        blended = _l2norm(weight * self.decay + means * (1 - self.decay))
        weight.copy_(torch.where(used[:, None], blended, weight))
        self.unused_steps.copy_(torch.where(used, 0, self.unused_steps + 1))
        if self.dead_code_steps > 0:
            self._restart_dead(flat, tokens)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, tokens: torch.Tensor) -> None:
        """Re-seed codes unused for ``dead_code_steps`` steps from this batch's encoder outputs.

        The replacements are rank 0's worst-fitting vectors (lowest cosine to their own code):
        deterministic, they put codes where the codebook covers the data worst, and they reach
        every rank through the same broadcast, so codebooks stay identical.
        """
        dead = (self.unused_steps >= self.dead_code_steps).nonzero().squeeze(1)  # [R]
        if dead.numel() == 0:
            return
        fit = (flat * self.embedding.weight[tokens]).sum(dim=-1)  # [M] cosine to own code
        order = fit.argsort()  # worst first; stable choice, no randomness
        pick = order[torch.arange(dead.numel(), device=flat.device) % order.numel()]
        seeds = self._from_rank0(flat[pick].clone())  # [R, D]
        self.embedding.weight[dead] = _l2norm(seeds)
        self.unused_steps[dead] = 0
