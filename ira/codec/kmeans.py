"""Seeded k-means (k-means++ init, Lloyd iterations) and nearest-centroid search, in chunks.

Distances are computed as ``|c|^2 - 2 x.c`` with one matrix multiply per chunk of rows, so
memory stays at ``chunk x k`` floats however many points there are.
"""

from __future__ import annotations

from typing import Callable

import torch

CHUNK_ROWS = 4096
INIT_POINTS_PER_CENTROID = 32
"""k-means++ seeds on a subsample of at most this many points per centroid (it is sequential in k)."""


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid for every row of `x` [N, D] and its squared distance."""
    c_sq = centroids.pow(2).sum(dim=1)
    c_t = centroids.T.contiguous()
    index = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    scores = torch.empty(min(chunk, x.shape[0]), centroids.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk]
        block = scores[: rows.shape[0]]
        torch.addmm(c_sq, rows, c_t, beta=1.0, alpha=-2.0, out=block)  # |c|^2 - 2 x.c
        torch.min(block, dim=1, out=(dist[start:start + chunk], index[start:start + chunk]))
    dist += x.pow(2).sum(dim=1)
    return index, dist.clamp_min_(0.0)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centroid is drawn with probability proportional to D(x)^2."""
    n = x.shape[0]
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids[0] = x[first]
    best = (x - x[first]).pow(2).sum(dim=1)
    for i in range(1, k):
        total = float(best.sum())
        if total > 0.0:
            pick = int(torch.multinomial(best / total, 1, generator=generator))
        else:  # fewer distinct points than centroids: any point will do
            pick = int(torch.randint(n, (1,), generator=generator))
        centroids[i] = x[pick]
        best = torch.minimum(best, (x - x[pick]).pow(2).sum(dim=1))
    return centroids


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator,
           progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Fit `k` centroids to the rows of `x` [N, D] (float32); returns [k, D].

    With no more points than centroids every point becomes a centroid and the rest repeat
    them (a duplicate is never the nearest, so it is simply never used). An emptied cluster is
    re-seeded with the point worst served by the current centroids.
    `progress(i)` is called after each Lloyd iteration.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    if n <= k:
        order = torch.randperm(n, generator=generator)
        return x[order].repeat((k + n - 1) // n, 1)[:k].clone()

    sample = x
    if n > INIT_POINTS_PER_CENTROID * k:
        sample = x[torch.randperm(n, generator=generator)[:INIT_POINTS_PER_CENTROID * k]]
    centroids = kmeans_plus_plus(sample, k, generator)

    previous: torch.Tensor | None = None
    for it in range(iters):
        index, dist = nearest(x, centroids)
        counts = torch.bincount(index, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, index, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).to(x.dtype)
        empty = torch.nonzero(~filled).flatten()
        if empty.numel():
            worst = torch.topk(dist, empty.numel()).indices
            centroids[empty] = x[worst]
        if progress is not None:
            progress(it + 1)
        if previous is not None and empty.numel() == 0 and torch.equal(index, previous):
            break  # converged: the next iteration would change nothing
        previous = index
    return centroids
