"""The PyTorch twin of configs/m2-mnist.toml, and the labels-only baseline, for
scripts/m2_quality.sh.

Picks 10 labeled digits per class from MNIST's training set (scripts/mnist_subset.py) and writes
the data for elbo: WORK/{x,y}_{train,test}.npy, training labels -1 where a digit counts as unlabeled.
Then trains on the same digits, the same recipe as elbo's M2 — classifier 784-500-10, encoder
784+10-500-(50, 50), decoder 50+10-500-784, ReLU, Bernoulli likelihood, log-variance clamped to
±10, prior N(0, I) and uniform p(y), dynamic binarisation, Adam (LR, default 2e-3), each batch
100 unlabeled digits of a shuffled epoch plus the 100 labeled ones, loss = mean over labeled of
(−ELBO(x,y) + alpha·CE) + mean over unlabeled of Σ_y q(y|x)(−ELBO(x,y)) − H(q(y|x)) — and a
classifier of the same architecture on the 100 labels alone. Prints JSON lines: the baseline,
then the twin's test accuracy after each epoch.

Usage: python scripts/m2_twin.py MNIST_DIR WORK EPOCHS [SEED [ALPHA [LR]]]
"""
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import mnist_subset

K, D, H, Z = 10, 784, 500, 50


def usage(problem):
    sys.exit(f"{problem}\nusage: python scripts/m2_twin.py MNIST_DIR WORK EPOCHS [SEED [ALPHA [LR]]]")


class M2(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.mu, self.lv = nn.Linear(D + K, H), nn.Linear(H, Z), nn.Linear(H, Z)
        self.dec1, self.dec2 = nn.Linear(Z + K, H), nn.Linear(H, D)
        self.cls1, self.cls2 = nn.Linear(D, H), nn.Linear(H, K)

    def logits(self, x):
        return self.cls2(F.relu(self.cls1(x)))

    def neg_elbo(self, x, y1h):
        """−ELBO(x, y) per row, −log p(y) included."""
        h = F.relu(self.enc(torch.cat([x, y1h], 1)))
        mu, lv = self.mu(h), self.lv(h).clamp(-10, 10)
        z = mu + torch.exp(0.5 * lv) * torch.randn_like(mu)
        out = self.dec2(F.relu(self.dec1(torch.cat([z, y1h], 1))))
        rec = F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
        kl = 0.5 * (lv.exp() + mu ** 2 - 1 - lv).sum(1)
        return rec + kl + math.log(K)


def m2_loss(m, xl, yl, xu, alpha):
    """The recipe's loss: mean over labeled of (−ELBO(x,y) + alpha·CE) + mean over unlabeled of
    Σ_y q(y|x)(−ELBO(x,y)) − H(q(y|x)), every class enumerated in one pass."""
    eye = torch.eye(K)
    labeled = m.neg_elbo(xl, eye[yl]) + alpha * F.cross_entropy(m.logits(xl), yl, reduction="none")
    bounds = m.neg_elbo(xu.repeat_interleave(K, 0), eye.repeat(len(xu), 1)).view(-1, K)
    logits = m.logits(xu)
    unlabeled = (F.softmax(logits, 1) * (bounds + F.log_softmax(logits, 1))).sum(1)
    return labeled.mean() + unlabeled.mean()


def accuracy(classify, x, y):
    with torch.no_grad():
        return (classify(x).argmax(1) == y).float().mean().item()


def main():
    if len(sys.argv) not in (4, 5, 6, 7):
        usage("expected MNIST_DIR, WORK and EPOCHS")
    mnist, work = sys.argv[1], sys.argv[2]
    try:
        epochs = int(sys.argv[3])
        seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
        alpha = float(sys.argv[5]) if len(sys.argv) > 5 else 100.0
        lr = float(sys.argv[6]) if len(sys.argv) > 6 else 2e-3
    except ValueError as e:
        usage(str(e))
    if epochs <= 0 or not (alpha >= 0 and math.isfinite(alpha)) or not (0 < lr < math.inf):
        usage("EPOCHS and LR must be positive and ALPHA ≥ 0")
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    x_train, partial, chosen, x_test, y_test = mnist_subset.write(mnist, work, seed)

    gray = torch.from_numpy(x_train.reshape(-1, D).astype(np.float32) / 255)
    test = torch.bernoulli(torch.from_numpy(x_test.reshape(-1, D).astype(np.float32) / 255),
                           generator=torch.Generator().manual_seed(seed))
    test_y = torch.from_numpy(y_test)
    xl, yl = gray[chosen], torch.from_numpy(partial[chosen])
    steps_per_epoch = len(gray) // 100

    # The baseline: the classifier alone, on the 100 labels, as many steps as the twin takes.
    base = M2()
    opt = torch.optim.Adam(list(base.cls1.parameters()) + list(base.cls2.parameters()), lr=lr)
    for _ in range(epochs * steps_per_epoch):
        loss = F.cross_entropy(base.logits(torch.bernoulli(xl)), yl)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(json.dumps({"impl": "labels-only classifier", "steps": epochs * steps_per_epoch,
                      "accuracy": accuracy(base.logits, test, test_y)}), flush=True)

    m = M2()
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    started = time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(gray))
        for s in range(steps_per_epoch):
            xu = torch.bernoulli(gray[order[s * 100:(s + 1) * 100]])
            loss = m2_loss(m, torch.bernoulli(xl), yl, xu, alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(json.dumps({"impl": "pytorch m2", "epoch": epoch + 1, "alpha": alpha, "lr": lr,
                          "accuracy": accuracy(m.logits, test, test_y),
                          "seconds": round(time.time() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
