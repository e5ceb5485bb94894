"""PyTorch twin of configs/ladder-mnist.toml: the same ladder VAE written plainly in PyTorch —
bottom-up blocks of one ReLU dense layer (512, then 256) with linear heads (μ̂, log σ̂²) per
layer; the top layer (32) against N(0, I); below it an MLP of z_2 (one ReLU layer of 512) gives
p(z_1|z_2) and the posterior of z_1 (64) is the precision-weighted merge of the two estimates;
the decoder z_1 → 512 → 784 logits, Bernoulli. Analytic KL per layer, linear KL warm-up
over 3,000 steps, Adam 1e-3, batch 100, digits binarised afresh on every visit; log-variances
clamped to ±10 as elbo does. Test figures: −ELBO, KL per layer, and the IW bound (k = 1000).
With BN=1, every hidden dense layer (no bias) is followed by nn.BatchNorm1d, as
`model.ladder.batch_norm = true` builds it; evaluation uses the running moments.

Usage:
  python scripts/ladder_twin.py train MNIST_DIR EPOCHS SEED
      one JSON line per evaluated epoch (1, 10, 30 … as reached) and the training time.
  python scripts/ladder_twin.py step [BATCH [STEPS [THREADS]]]
      times training steps on a fixed random binary batch (like `elbo bench train --config
      configs/ladder-mnist.toml --shape 1,28,28 --batch-size 100`).
"""
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DIMS, HIDDEN, DEPTH, WARMUP, CLAMP = [64, 32], [512, 256], 1, 3000, 10.0
BN = os.environ.get("BN", "0") == "1"


def block(n_in, width):
    layers, d = [], n_in
    for _ in range(DEPTH):
        if BN:
            layers += [nn.Linear(d, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        else:
            layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers)


class Ladder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ModuleList([block(784, HIDDEN[0]), block(HIDDEN[0], HIDDEN[1])])
        self.up_mu = nn.ModuleList([nn.Linear(h, d) for h, d in zip(HIDDEN, DIMS)])
        self.up_lv = nn.ModuleList([nn.Linear(h, d) for h, d in zip(HIDDEN, DIMS)])
        self.down = block(DIMS[1], HIDDEN[0])
        self.down_mu = nn.Linear(HIDDEN[0], DIMS[0])
        self.down_lv = nn.Linear(HIDDEN[0], DIMS[0])
        self.dec = nn.Sequential(block(DIMS[0], HIDDEN[0]), nn.Linear(HIDDEN[0], 784))

    def forward(self, x, eps1, eps2):
        """Returns logits, per-layer KL (B,), and log q − log p of the drawn latents (B,)."""
        h1 = self.up[0](x)
        h2 = self.up[1](h1)
        m1, l1 = self.up_mu[0](h1), self.up_lv[0](h1).clamp(-CLAMP, CLAMP)
        m2, l2 = self.up_mu[1](h2), self.up_lv[1](h2).clamp(-CLAMP, CLAMP)
        z2 = m2 + (0.5 * l2).exp() * eps2
        kl2 = 0.5 * (l2.exp() + m2 ** 2 - 1 - l2).sum(1)
        t = self.down(z2)
        mp, lp = self.down_mu(t), self.down_lv(t).clamp(-CLAMP, CLAMP)
        prec = (-l1).exp() + (-lp).exp()
        lq = -prec.log()
        mq = (m1 * (-l1).exp() + mp * (-lp).exp()) / prec
        z1 = mq + (0.5 * lq).exp() * eps1
        kl1 = 0.5 * (lp - lq + (lq.exp() + (mq - mp) ** 2) / lp.exp() - 1).sum(1)
        ratio = (0.5 * (z2 ** 2 - l2 - eps2 ** 2)).sum(1) + \
            (0.5 * (lp + (z1 - mp) ** 2 / lp.exp() - lq - eps1 ** 2)).sum(1)
        return self.dec(z1), kl1, kl2, ratio

    def eps(self, n):
        return torch.randn(n, DIMS[0]), torch.randn(n, DIMS[1])


def nll(logits, x):
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)


def load(path):
    with gzip.open(path) as f:
        data = f.read()
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=16).astype(np.float32) / 255.0).view(-1, 784)


@torch.no_grad()
def evaluate(m, x, k):
    m.eval()
    gen = torch.Generator().manual_seed(1)
    xb = torch.bernoulli(x, generator=gen)
    rec = kl1 = kl2 = iw = 0.0
    for i in range(0, xb.shape[0], 100):
        b = xb[i:i + 100]
        logits, k1, k2, _ = m(b, *m.eps(b.shape[0]))
        rec += nll(logits, b).sum().item()
        kl1 += k1.sum().item()
        kl2 += k2.sum().item()
        rep = b.repeat(k, 1)
        logits, _, _, ratio = m(rep, *m.eps(rep.shape[0]))
        logw = (-nll(logits, rep) - ratio).view(k, -1)
        iw -= (torch.logsumexp(logw, 0) - math.log(k)).sum().item()
    n = xb.shape[0]
    m.train()
    return {"neg_elbo": (rec + kl1 + kl2) / n, "kl_layers": [kl1 / n, kl2 / n], "nll_iw": iw / n}


def train(argv):
    data, epochs, seed = argv[0], int(argv[1]), int(argv[2])
    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    xtr = load(os.path.join(data, "train-images-idx3-ubyte.gz"))
    xte = load(os.path.join(data, "t10k-images-idx3-ubyte.gz"))
    k = int(os.environ.get("IW", "1000"))
    m = Ladder()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    step, seconds = 0, 0.0
    for epoch in range(1, epochs + 1):
        start = time.time()
        for batch in torch.randperm(xtr.shape[0]).split(100):
            x = torch.bernoulli(xtr[batch])
            logits, kl1, kl2, _ = m(x, *m.eps(x.shape[0]))
            w = min(1.0, (step + 1) / WARMUP)
            loss = (nll(logits, x) + w * (kl1 + kl2)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        seconds += time.time() - start
        if epoch in (1, 10, 30, epochs):
            print(json.dumps({"impl": "pytorch twin", "epoch": epoch, "train_seconds": round(seconds, 1),
                              **evaluate(m, xte, k)}), flush=True)


def bench(argv):
    batch, steps, threads = ([int(a) for a in argv] + [100, 200, 2][len(argv):])[:3]
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    x = (torch.rand(batch, 784) > 0.5).float()
    m = Ladder()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)

    def step():
        logits, kl1, kl2, _ = m(x, *m.eps(batch))
        loss = (nll(logits, x) + kl1 + kl2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    secs = time.perf_counter() - start
    print(json.dumps({"samples_per_s": batch * steps / secs, "ms_per_step": 1000 * secs / steps, "loss": loss}))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "step") or (sys.argv[1] == "train" and len(sys.argv) != 5):
        sys.exit(__doc__)
    (train if sys.argv[1] == "train" else bench)(sys.argv[2:])
