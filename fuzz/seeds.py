#!/usr/bin/env python3
"""Writes the hand-made seeds of the fuzz corpora (corpus/<target>/seed-*): small valid inputs
of each format, so that mutation starts from files that get past the first checks. The
corpora's other files are inputs the fuzzer found that reach new code, minimized.

    python3 fuzz/seeds.py target/debug/elbo     # the Parquet seeds are converted by elbo
"""

import gzip
import json
import pathlib
import struct
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent


def put(target, name, data):
    folder = HERE / "corpus" / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"seed-{name}").write_bytes(data)


def idx(magic, dims, body):
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + bytes(body)


def npy(descr, shape, body):
    dims = ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "")
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + body


def framed(fields):
    """A gRPC message (5-byte prefix) of protobuf `fields`: (number, int or bytes)."""

    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    body = b""
    for number, value in fields:
        if isinstance(value, bytes):
            body += varint(number << 3 | 2) + varint(len(value)) + value
        else:
            body += varint(number << 3) + varint(value)
    return b"\x00" + struct.pack(">I", len(body)) + body


def sized(rows, flags, first, second=b""):
    return bytes([rows, flags]) + struct.pack(">H", len(first)) + first + second


def main():
    elbo = sys.argv[1] if len(sys.argv) > 1 else "target/debug/elbo"
    images = idx(0x803, [3, 2, 2], range(12))
    labels = idx(0x801, [3], [0, 1, 2])
    put("convert_idx", "images", sized(2, 0, images))
    put("convert_idx", "labeled", sized(2, 1, images, labels))
    put("convert_idx", "gzipped", sized(7, 1, gzip.compress(images, mtime=0), labels))

    u8 = npy("|u1", (3, 2, 2), bytes(range(12)))
    f32 = npy("<f4", (2, 4), struct.pack("<8f", *[0.5 * i for i in range(8)]))
    f64 = npy("<f8", (2, 2), struct.pack("<4d", 0.0, 1.0, 0.25, 0.75))
    lab = npy("<i8", (3,), struct.pack("<3q", 0, -1, 2))
    put("convert_npy", "u8", sized(2, 0, u8))
    put("convert_npy", "labeled", sized(2, 1, u8, lab))
    put("convert_npy", "f32-shape", sized(1, 2 | (2 << 2), f32))
    put("convert_npy", "f64", sized(3, 0, f64))

    put("convert_csv", "plain", bytes([2, 2]) + b"1,2,3,4\n5,6,7,8\n")
    put("convert_csv", "header", bytes([2, 1 | (1 << 2)]) + b"label,a,b\n1,0,255\n,3,4\n")
    put("convert_csv", "float", bytes([4, 16 | 32 | (2 << 6)]) + b"0.5,1e-3,2,-1\n0,0,0,0\n")

    for name, chunks in {
        "one": [[(1, 5), (2, 9), (3, 1), (4, 0), (5, 1), (6, struct.pack("<4f", 1, 2, 3, 4)), (7, 1)]],
        "two": [
            [(1, 5), (2, 1), (3, 2), (7, 1), (6, b"\x00" * 8)],
            [(1, 5), (2, 1), (3, 1), (4, 1), (5, 2), (7, 1)],
        ],
    }.items():
        stream = b"".join(framed(c) for c in chunks)
        put("ring_stream", name, bytes([3, 7, 1, 30]) + stream)

    def safetensors(tensors):
        header, body = {}, b""
        for name, shape in tensors:
            n = 1
            for d in shape:
                n *= d
            data = struct.pack(f"<{n}f", *[0.125 * i for i in range(n)])
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
            body += data
        text = json.dumps(header, separators=(",", ":")).encode()
        return struct.pack("<Q", len(text)) + text + body

    model = safetensors([("bn.mean", [3]), ("enc.bias", [3]), ("enc.weight", [3, 2])])
    optim = safetensors([(f"{b}.{n}", s) for b in ("m", "v") for n, s in (("enc.bias", [3]), ("enc.weight", [3, 2]))])
    state = json.dumps({"format": 1, "step": 7, "cursor": {"epoch": 0, "step": 7}, "nonfinite_total": 0,
                        "optimizer_step": 7, "seed": 0, "config_sha256": "ab" * 32}).encode()
    put("checkpoint", "adam", struct.pack(">HH", len(model), len(optim)) + model + optim + state)
    sgd = safetensors([])
    put("checkpoint", "sgd", struct.pack(">HH", len(model), len(sgd)) + model + sgd + state)

    for config in sorted((HERE.parent / "configs").glob("*-sprites.toml")):
        put("config", config.stem, config.read_bytes())
    put("config", "overrides", b"[train]\nsteps = 5\n\0model.kind=m2\0ELBO__TRAIN__BATCH_SIZE=8"
        b"\0model.hidden=[64, 32]")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "images.idx").write_bytes(idx(0x803, [5, 2, 2], range(20)))
        (tmp / "labels.idx").write_bytes(idx(0x801, [5], [0, 1, 2, 3, 4]))
        (tmp / "f.csv").write_text("label,a,b,c\n1,0.5,0.25,1\n,0,0,0\n2,1,1,1\n")
        runs = {
            "u8-labeled": ["--format", "idx", "--images", tmp / "images.idx",
                           "--labels", tmp / "labels.idx", "--row-group-size", "2"],
            "f32-nulls": ["--format", "csv", "--images", tmp / "f.csv", "--pixel-type", "float32",
                          "--shape", "1,3"],
        }
        for name, args in runs.items():
            out = tmp / f"{name}.parquet"
            subprocess.run([elbo, "data", "convert", *map(str, args), "--out", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
            put("parquet", name, out.read_bytes())


if __name__ == "__main__":
    main()
