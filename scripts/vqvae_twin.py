"""PyTorch twin of configs/vqvae-mnist.toml: the same VQ-VAE recipe written plainly in PyTorch —
encoder x−½ → 4×4 s2 convs 32, 64 (ReLU) → 3×3 conv → 2 residual blocks (ReLU, 3×3 to 32, ReLU,
1×1 back, + skip) → ReLU → 1×1 to D=16; nearest of K=128 codes (ties → lowest), straight-through;
decoder 3×3 from D → 2 residual blocks → ReLU → 4×4 s2 transposed convs 32 (ReLU), 1. Loss:
MSE / data variance + β·commitment (β 0.25), EMA codebook (γ 0.99, ε 1e-5, Laplace smoothing,
counts start at 1 and sums at the codebook), codes whose EMA count falls below 1 restarted from
random encoder outputs of the batch (count reset to 1). Adam 1e-3, batch 128, codes uniform
±√(3/D) (+ an offset for the recovery experiment), or with --kmeans N (elbo's
`init = "kmeans"`, `kmeans_iterations = N`) k-means on the first batch's encoder outputs: K
distinct outputs as seeds, N Lloyd iterations, the step trained with the centroids and its EMA
update starting as usual (count 1, sum = code) at one more Lloyd step's centroids, no restarts.

Usage:
  python scripts/vqvae_twin.py train MNIST_DIR STEPS SEED [--offset F] [--no-restart] [--kmeans N]
      trains on the training set, then prints one JSON line of test figures (nmse, mse,
      codes_used, perplexity) and the training time.
  python scripts/vqvae_twin.py step [BATCH [STEPS [THREADS]]]
      times training steps on a fixed random batch (like `elbo bench train --config
      configs/vqvae-mnist.toml --shape 1,28,28`): one JSON line, samples_per_s and ms_per_step.
"""
import gzip
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

K, D, BETA, GAMMA, EPS, VARIANCE, THRESHOLD = 128, 16, 0.25, 0.99, 1e-5, 0.0949, 1.0


class Residual(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv1 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class VqVae(nn.Module):
    def __init__(self, offset=0.0, restart=True):
        super().__init__()
        self.enc = nn.ModuleList([nn.Conv2d(1, 32, 4, 2, 1), nn.Conv2d(32, 64, 4, 2, 1)])
        self.enc_out = nn.Conv2d(64, 64, 3, padding=1)
        self.enc_res = nn.ModuleList([Residual(64, 32) for _ in range(2)])
        self.pre_vq = nn.Conv2d(64, D, 1)
        self.dec_in = nn.Conv2d(D, 64, 3, padding=1)
        self.dec_res = nn.ModuleList([Residual(64, 32) for _ in range(2)])
        self.dec = nn.ModuleList([nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ConvTranspose2d(32, 1, 4, 2, 1)])
        bound = (3.0 / D) ** 0.5
        codebook = torch.empty(K, D).uniform_(-bound, bound) + offset
        self.register_buffer("codebook", codebook)
        self.register_buffer("count", torch.ones(K))
        self.register_buffer("sum", codebook.clone())
        self.restart = restart
        self.initialising = False

    def encode(self, x):
        h = x.view(-1, 1, 28, 28) - 0.5
        for conv in self.enc:
            h = F.relu(conv(h))
        h = self.enc_out(h)
        for block in self.enc_res:
            h = block(h)
        return self.pre_vq(F.relu(h))

    def decode(self, zq):
        h = self.dec_in(zq)
        for block in self.dec_res:
            h = block(h)
        h = F.relu(h)
        h = F.relu(self.dec[0](h))
        return self.dec[1](h).view(zq.shape[0], -1) + 0.5

    def quantise(self, z):
        rows = z.permute(0, 2, 3, 1).reshape(-1, D)
        dist = (rows.detach().unsqueeze(1) - self.codebook.unsqueeze(0)).pow(2).sum(-1)
        idx = dist.argmin(1)  # first minimum: ties go to the lowest index
        e = self.codebook[idx]
        zq = rows + (e - rows).detach()
        return rows, idx, e, zq.view(z.shape[0], z.shape[2], z.shape[3], D).permute(0, 3, 1, 2)

    def loss(self, x):
        rows, idx, e, zq = self.quantise(self.encode(x))
        out = self.decode(zq)
        mse = (out - x).pow(2).mean()
        commit = (rows - e.detach()).pow(2).mean()
        return mse / VARIANCE + BETA * commit, (rows.detach(), idx, mse.item())

    @torch.no_grad()
    def kmeans(self, x, iterations):
        rows = self.encode(x).permute(0, 2, 3, 1).reshape(-1, D)
        centroids = rows[torch.randperm(rows.shape[0])[:K]].clone()
        for _ in range(iterations):
            idx = (rows.unsqueeze(1) - centroids.unsqueeze(0)).pow(2).sum(-1).argmin(1)
            onehot = F.one_hot(idx, K).float()
            n = onehot.sum(0)
            used = n > 0
            centroids[used] = (onehot.t() @ rows)[used] / n[used].unsqueeze(1)
        self.codebook.copy_(centroids)
        self.initialising = True

    @torch.no_grad()
    def ema(self, rows, idx):
        onehot = F.one_hot(idx, K).float()
        dead = self.count < THRESHOLD
        if self.initialising:
            # The EMA starts as usual (count 1, sum = code) at one more Lloyd step's centroids.
            n = onehot.sum(0)
            used = n > 0
            self.count.fill_(1.0)
            self.sum[used] = (onehot.t() @ rows)[used] / n[used].unsqueeze(1)
            dead[:] = False
            self.initialising = False
        self.count.mul_(GAMMA).add_(onehot.sum(0), alpha=1 - GAMMA)
        self.sum.mul_(GAMMA).add_(onehot.t() @ rows, alpha=1 - GAMMA)
        n = self.count.sum()
        smoothed = (self.count + EPS) / (n + K * EPS) * n
        self.codebook.copy_(self.sum / smoothed.unsqueeze(1))
        if self.restart and dead.any():
            pick = rows[torch.randint(0, rows.shape[0], (int(dead.sum()),))]
            self.codebook[dead] = pick
            self.count[dead] = THRESHOLD
            self.sum[dead] = THRESHOLD * pick


def load(path):
    with gzip.open(path) as f:
        data = f.read()
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=16).astype(np.float32) / 255.0).view(-1, 784)


@torch.no_grad()
def evaluate(m, x):
    mse, counts = 0.0, torch.zeros(K)
    for i in range(0, x.shape[0], 500):
        xb = x[i:i + 500]
        _, idx, _, zq = m.quantise(m.encode(xb))
        mse += (m.decode(zq) - xb).pow(2).mean(1).sum().item()
        counts += torch.bincount(idx, minlength=K).float()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    mse /= x.shape[0]
    return {"nmse": mse / VARIANCE, "mse": mse, "codes_used": int((counts > 0).sum()), "perplexity": perplexity}


def train(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    data, steps, seed = argv[0], int(argv[1]), int(argv[2])
    offset = float(argv[argv.index("--offset") + 1]) if "--offset" in argv else 0.0
    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    xtr = load(os.path.join(data, "train-images-idx3-ubyte.gz"))
    xte = load(os.path.join(data, "t10k-images-idx3-ubyte.gz"))
    kmeans = int(argv[argv.index("--kmeans") + 1]) if "--kmeans" in argv else 0
    m = VqVae(offset, "--no-restart" not in argv)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    start, step = time.time(), 0
    while step < steps:
        for batch in torch.randperm(xtr.shape[0]).split(128):
            if step == steps:
                break
            if step == 0 and kmeans:
                m.kmeans(xtr[batch], kmeans)
            loss, (rows, idx, _) = m.loss(xtr[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            m.ema(rows, idx)
            step += 1
    seconds = time.time() - start
    print(json.dumps({"impl": "pytorch twin", "steps": steps, "offset": offset,
                      "restart": m.restart, "kmeans": kmeans, "seconds": round(seconds, 1), **evaluate(m, xte)}))


def bench(argv):
    batch, steps, threads = ([int(a) for a in argv] + [128, 100, 2][len(argv):])[:3]
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    x = torch.rand(batch, 784)
    m = VqVae()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)

    def step():
        loss, (rows, idx, _) = m.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.ema(rows, idx)
        return loss.item()

    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    secs = time.perf_counter() - start
    print(json.dumps({"samples_per_s": batch * steps / secs, "ms_per_step": 1000 * secs / steps, "loss": loss}))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "step"):
        sys.exit(__doc__)
    (train if sys.argv[1] == "train" else bench)(sys.argv[2:])
