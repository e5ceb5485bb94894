"""PyTorch twin of configs/vqvae-prior-mnist.toml: the gated PixelCNN prior over a VQ-VAE's 7×7
codes, written plainly in PyTorch, on the codes of the VQ-VAE twin of scripts/vqvae_twin.py.

The prior (van den Oord et al. 2016): codes embedded to C = 64 features (uniform ±1); 8 gated
layers, each a vertical stack (3×3 taps on the rows above; the first layer's strictly above)
and a horizontal stack (taps to the left; the first layer's strictly left) reading the vertical
stack through a 1×1 convolution, tanh(a)·σ(b) gates, a 1×1 convolution out of the horizontal
gate, residual after the first layer; head ReLU → 1×1 (ReLU) → 1×1 to K = 128 logits. The
masked taps are cut out of the kernels (shifted, asymmetrically padded convolutions: what a
PyTorch user writes), weights and biases uniform ±1/√(inputs × taps). Adam 1e-3, batch 128,
cross-entropy summed over positions, averaged over the batch; bits/dim = nats per position / ln 2.

Usage:
  python scripts/code_prior_twin.py train MNIST_DIR VQ_STEPS EPOCHS SEED
      trains the VQ-VAE twin for VQ_STEPS steps, encodes the training and test digits, trains
      the prior EPOCHS epochs on the training codes; one JSON line: test bits_per_dim, nll
      (nats per digit) and the prior's training time.
  python scripts/code_prior_twin.py step [BATCH [STEPS [THREADS]]]
      times prior training steps on a fixed random batch of digits, each encoded by a VQ-VAE
      encoder first (like `elbo bench train --config configs/vqvae-prior-mnist.toml --shape
      1,28,28`): one JSON line, samples_per_s and ms_per_step.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vqvae_twin import K, VqVae, load  # noqa: E402

C, LAYERS, KERNEL, SIDE = 64, 8, 3, 7


class Shifted(nn.Module):
    """A convolution over rows r−a … r−a+kh−1 and columns c−b … c−b+kw−1 of each position."""

    def __init__(self, cin, cout, kh, kw, a, b):
        super().__init__()
        bound = 1.0 / math.sqrt(cin * kh * kw)
        self.weight = nn.Parameter(torch.empty(cout, cin, kh, kw).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(cout).uniform_(-bound, bound))
        self.pad = (b, kw - 1 - b, a, kh - 1 - a)

    def forward(self, x):
        return F.conv2d(F.pad(x, self.pad), self.weight, self.bias)


def pointwise(cin, cout):
    conv = nn.Conv2d(cin, cout, 1)
    bound = 1.0 / math.sqrt(cin)
    nn.init.uniform_(conv.weight, -bound, bound)
    nn.init.uniform_(conv.bias, -bound, bound)
    return conv


def gate(x):
    a, b = x.chunk(2, 1)
    return torch.tanh(a) * torch.sigmoid(b)


class Layer(nn.Module):
    def __init__(self, first):
        super().__init__()
        h = KERNEL // 2
        rows = h if first else h + 1
        cols = h if first else h + 1
        self.vertical = Shifted(C, 2 * C, rows, KERNEL, h, h)
        self.horizontal = Shifted(C, 2 * C, 1, cols, 0, h)
        self.v_to_h = pointwise(2 * C, 2 * C)
        self.out = pointwise(C, C)
        self.first = first

    def forward(self, v, h):
        v_pre = self.vertical(v)
        h_pre = self.horizontal(h) + self.v_to_h(v_pre)
        h_out = self.out(gate(h_pre))
        return gate(v_pre), h_out if self.first else h_out + h


class Prior(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(K, C).uniform_(-1, 1))
        self.layers = nn.ModuleList([Layer(i == 0) for i in range(LAYERS)])
        self.head, self.logits = pointwise(C, C), pointwise(C, K)

    def nll(self, codes):
        """Each grid's negative log-likelihood in nats: codes (B, 7, 7) → (B,)."""
        x = self.embedding[codes].permute(0, 3, 1, 2)
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h)
        logits = self.logits(F.relu(self.head(F.relu(h))))
        return F.cross_entropy(logits, codes, reduction="none").sum((1, 2))


@torch.no_grad()
def encode(vq, x):
    out = []
    for i in range(0, x.shape[0], 1000):
        _, idx, _, _ = vq.quantise(vq.encode(x[i:i + 1000]))
        out.append(idx.view(-1, SIDE, SIDE))
    return torch.cat(out)


def train(argv):
    if len(argv) != 4:
        sys.exit(__doc__)
    data, vq_steps, epochs, seed = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    xtr = load(os.path.join(data, "train-images-idx3-ubyte.gz"))
    xte = load(os.path.join(data, "t10k-images-idx3-ubyte.gz"))
    vq = VqVae()
    opt = torch.optim.Adam(vq.parameters(), lr=1e-3)
    step = 0
    while step < vq_steps:
        for batch in torch.randperm(xtr.shape[0]).split(128):
            if step == vq_steps:
                break
            loss, (rows, idx, _) = vq.loss(xtr[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            vq.ema(rows, idx)
            step += 1
    ctr, cte = encode(vq, xtr), encode(vq, xte)
    prior = Prior()
    opt = torch.optim.Adam(prior.parameters(), lr=1e-3)
    start = time.time()
    for _ in range(epochs):
        for batch in torch.randperm(ctr.shape[0]).split(128):
            loss = prior.nll(ctr[batch]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.time() - start
    with torch.no_grad():
        nll = sum(prior.nll(cte[i:i + 1000]).sum().item() for i in range(0, cte.shape[0], 1000))
    nll /= cte.shape[0]
    print(json.dumps({"impl": "pytorch twin", "vq_steps": vq_steps, "epochs": epochs,
                      "seconds": round(seconds, 1), "nll": nll,
                      "bits_per_dim": nll / (SIDE * SIDE * math.log(2))}))


def bench(argv):
    batch, steps, threads = ([int(a) for a in argv] + [128, 20, 2][len(argv):])[:3]
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    x = torch.rand(batch, 784)
    vq, prior = VqVae(), Prior()
    opt = torch.optim.Adam(prior.parameters(), lr=1e-3)

    def step():
        with torch.no_grad():
            _, idx, _, _ = vq.quantise(vq.encode(x))
        loss = prior.nll(idx.view(-1, SIDE, SIDE)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(3):
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
