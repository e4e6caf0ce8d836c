"""InMaP written literally from DESIGN.md, full batch, every iteration: the reference that the
streaming implementation (inmap.proxy) is checked against in tests/test_proxy.py, and the
baseline benchmarks/proxy.py times it against. Written once, here."""

from __future__ import annotations

import torch


def literal_inmap(X, T, *, refine="sinkhorn", tau_t=0.01, tau_i=0.04, alpha=0.6, gamma=0.0,
                  lr=10.0, iters=2000, sinkhorn_iters=20, dtype=torch.float64):  # fmt: skip
    """The vision proxy W (C, d) of unit image features X (n, d) and text proxies T (C, d)."""
    X = torch.nn.functional.normalize(torch.as_tensor(X).to(dtype), dim=1)
    T = torch.nn.functional.normalize(torch.as_tensor(T).to(dtype), dim=1)
    n, C = X.shape[0], T.shape[0]
    P = torch.softmax(X @ T.T / tau_t, dim=1)  # (n, C) pseudo-labels
    if refine == "sinkhorn":
        q = (P / n).sum(0) ** gamma if gamma > 0 else torch.ones(C, dtype=dtype)
        q = q / q.sum()  # (C,) class marginal
        Q = P / n
        for _ in range(sinkhorn_iters):
            Q = Q * (q / Q.sum(0))
            Q = Q / (n * Q.sum(1, keepdim=True))
        P = Q * n
    top, cls = P.max(1)
    P = torch.where((top > alpha)[:, None], torch.nn.functional.one_hot(cls, C).to(dtype), P)
    W, previous = T.clone(), float("inf")
    for _ in range(iters):
        G = torch.softmax(X @ W.T / tau_i, dim=1).T @ X - P.T @ X  # (C, d)
        if G.norm() > previous:
            lr /= 2
        previous = G.norm()
        W = torch.nn.functional.normalize(W - lr / (n * tau_i) * G, dim=1)
    return W
