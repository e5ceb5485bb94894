"""Times one training step of the PyTorch twin of configs/m2-mnist.toml (scripts/m2_twin.py's
model and loss) on a fixed random binary batch, half labeled, like
`elbo bench train --config configs/m2-mnist.toml --batch-size 200 --shape 1,28,28`.

Usage: python scripts/m2_step.py [BATCH [STEPS [THREADS]]]   (defaults 200, 200, 2)
Prints one JSON line: samples_per_s, ms_per_step, the final loss.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from m2_twin import K, D, M2, m2_loss  # noqa: E402


def main():
    try:
        batch, steps, threads = ([int(a) for a in sys.argv[1:4]] + [200, 200, 2][len(sys.argv) - 1:])[:3]
    except ValueError as e:
        sys.exit(f"{e}\nusage: python scripts/m2_step.py [BATCH [STEPS [THREADS]]]")
    if len(sys.argv) > 4 or batch < 2 or batch % 2 or steps <= 0 or threads <= 0:
        sys.exit("usage: python scripts/m2_step.py [BATCH [STEPS [THREADS]]]: "
                 "an even BATCH ≥ 2, positive STEPS and THREADS")
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    alpha = 100.0
    half = batch // 2
    x = (torch.rand(batch, D) > 0.5).float()
    xl, xu = x[:half], x[half:]
    yl = torch.randint(0, K, (half,))
    m = M2()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)

    def step():
        loss = m2_loss(m, xl, yl, xu, alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    for _ in range(10):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    seconds = time.perf_counter() - started
    print(json.dumps({"impl": "pytorch m2", "threads": torch.get_num_threads(), "batch": batch,
                      "samples_per_s": batch * steps / seconds,
                      "ms_per_step": seconds * 1e3 / steps, "loss": loss.item()}))


if __name__ == "__main__":
    main()
