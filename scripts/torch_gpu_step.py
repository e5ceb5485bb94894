"""PyTorch eager twin of `elbo bench train` on a GPU: full training steps (forward, backward,
Adam) of the reference MLP VAE 784-400-20 or of elbo's convolutional VAE (4x4 stride-2 convs
1-32-64[-64], a dense layer of 256, latent 10, mirrored transposed convs), Bernoulli likelihood,
on a fixed random binary batch. Prints one JSON line like `elbo bench train --json`.

    python scripts/torch_gpu_step.py mlp 1024 [STEPS]
    python scripts/torch_gpu_step.py conv 1024 [STEPS] [SIDE]

Timed with the device synchronised before and after the timed steps (after 10 warm-up steps).
"""
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class MlpVae(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1 = nn.Linear(784, 400)
        self.mu = nn.Linear(400, 20)
        self.lv = nn.Linear(400, 20)
        self.d1 = nn.Linear(20, 400)
        self.d2 = nn.Linear(400, 784)

    def forward(self, x):
        h = F.relu(self.e1(x))
        mu, lv = self.mu(h), self.lv(h)
        z = mu + torch.exp(0.5 * lv) * torch.randn_like(mu)
        logits = self.d2(F.relu(self.d1(z)))
        return logits, mu, lv


class ConvVae(nn.Module):
    def __init__(self, side, hidden=256, z=10):
        super().__init__()
        chans = [32, 64, 64][: (3 if side == 64 else 2)]
        self.last = {28: 7, 32: 8, 64: 8}[side]
        enc, cin = [], 1
        for c in chans:
            enc += [nn.Conv2d(cin, c, 4, 2, 1), nn.ReLU()]
            cin = c
        self.enc = nn.Sequential(*enc)
        feat = cin * self.last * self.last
        self.fc = nn.Linear(feat, hidden)
        self.mu = nn.Linear(hidden, z)
        self.lv = nn.Linear(hidden, z)
        self.d1 = nn.Linear(z, hidden)
        self.d2 = nn.Linear(hidden, feat)
        dec, rc = [], list(reversed(chans)) + [1]
        for i in range(len(rc) - 1):
            dec.append(nn.ConvTranspose2d(rc[i], rc[i + 1], 4, 2, 1))
            if i + 2 < len(rc):
                dec.append(nn.ReLU())
        self.dec = nn.Sequential(*dec)
        self.c0 = rc[0]

    def forward(self, x):
        h = F.relu(self.fc(self.enc(x).flatten(1)))
        mu, lv = self.mu(h), self.lv(h)
        z = mu + torch.exp(0.5 * lv) * torch.randn_like(mu)
        g = F.relu(self.d2(F.relu(self.d1(z)))).view(-1, self.c0, self.last, self.last)
        return self.dec(g), mu, lv


def main():
    kind, bs = sys.argv[1], int(sys.argv[2])
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    side = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    dev = torch.device("cuda")
    torch.manual_seed(0)
    if kind == "mlp":
        model, shape = MlpVae(), (bs, 784)
    elif kind == "conv":
        model, shape = ConvVae(side), (bs, 1, side, side)
    else:
        raise SystemExit(f"model {kind!r}: expected mlp or conv")
    model = model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = (torch.rand(shape, device=dev) > 0.5).float()

    def step():
        logits, mu, lv = model(x)
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)
        kl = 0.5 * (lv.exp() + mu.pow(2) - 1 - lv).sum(-1)
        loss = (rec + kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / steps
    print(json.dumps({
        "model": f"torch {kind} vae",
        "batch_size": bs,
        "steps": steps,
        "samples_per_s": bs / dt,
        "ms_per_step": dt * 1e3,
        "final_loss": loss.item(),
    }))


if __name__ == "__main__":
    main()
