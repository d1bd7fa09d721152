"""Pretraining throughput: samples/s and the fraction of the machine's fp32 matmul peak.

    python bench/bench_pretrain_throughput.py --repeats 5

Times the library's own end-to-end pretraining loop (`dec_mlflow.training.pretrain_end_to_end`)
on MNIST-shaped data with the default d-500-500-2000-10 autoencoder, interleaving every
configuration with a fresh measurement of the fp32 matmul peak so that the ratios are taken side by
side under the same machine load. Reports medians over the repeats.
"""

from __future__ import annotations

import argparse
import time

import torch

from _report import machine, matmul_peak_gflops, median, write_section
from dec_mlflow.callbacks import Callback
from dec_mlflow.model import Autoencoder
from dec_mlflow.training import pretrain_end_to_end

DIMS = (784, 500, 500, 2000, 10)


def train_flops_per_sample(dims) -> float:
    """Matmul FLOPs of one training step per sample: forward, input gradients and weight gradients.

    Each Linear(n_in, n_out) costs 2*n_in*n_out FLOPs forward, the same for the weight gradient
    and for the input gradient, except the first layer, whose input (the data) needs no gradient.
    """
    layers = list(zip(dims[:-1], dims[1:]))
    layers += [(b, a) for a, b in reversed(layers)]
    return sum(6 * a * b for a, b in layers) - 2 * dims[0] * dims[1]


def time_pretraining(x: torch.Tensor, batch_size: int, precision: str, epochs: int = 1) -> float:
    """Samples per second of ``epochs`` epochs of the real pretraining loop."""
    torch.manual_seed(0)
    ae = Autoencoder(DIMS)
    start = time.perf_counter()
    pretrain_end_to_end(ae, x, callback=Callback(), epochs=epochs, batch_size=batch_size, lr=1.0, momentum=0.9,
                        lr_schedule="constant", precision=precision)
    return x.shape[0] * epochs / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=20000, help="samples per timed epoch")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.samples, DIMS[0])
    configs = [(256, "fp32"), (256, "bf16"), (1024, "fp32"), (1024, "bf16")]
    flops = train_flops_per_sample(DIMS)
    peaks, bf16_peaks, rates = [], [], {c: [] for c in configs}
    time_pretraining(x[:2048], 256, "fp32")  # warm-up: allocator, thread pool, oneDNN kernels
    for r in range(args.repeats):
        peaks.append(matmul_peak_gflops(torch.float32))
        bf16_peaks.append(matmul_peak_gflops(torch.bfloat16))
        for c in configs:
            rates[c].append(time_pretraining(x, *c))
        print(f"repeat {r + 1}: fp32 peak {peaks[-1]:.0f} GFLOP/s, " + ", ".join(
            f"bs{c[0]} {c[1]} {rates[c][-1]:.0f}/s" for c in configs), flush=True)
    peak = median(peaks)
    lines = ["| batch | precision | samples/s | epoch of 70k (s) | GFLOP/s | fraction of fp32 peak |", "|---|---|---|---|---|---|"]
    for c in configs:
        rate = median(rates[c])
        lines.append(f"| {c[0]} | {c[1]} | {rate:.0f} | {70000 / rate:.1f} | {rate * flops / 1e9:.0f} | {rate * flops / 1e9 / peak:.0%} |")
    body = (
        f"Command: `python bench/bench_pretrain_throughput.py --repeats {args.repeats}`\n\n"
        f"Machine: {machine()}. Medians of {args.repeats} repeats, each configuration timed over one epoch of "
        f"{args.samples} samples of the real pretraining loop, d-500-500-2000-10, SGD + momentum. "
        f"Training FLOPs per sample (forward + both backward matmuls): {flops / 1e6:.1f} MFLOP. "
        f"Measured in the same run: fp32 matmul peak {peak:.0f} GFLOP/s (2048^3, median), "
        f"bf16 {median(bf16_peaks):.0f} GFLOP/s. bf16 rows count the same FLOPs against the fp32 peak.\n\n"
        + "\n".join(lines)
    )
    print(body)
    write_section("Pretraining throughput", body)


if __name__ == "__main__":
    main()
