"""Serving speed: ONNX Runtime vs PyTorch eager predict, then the served model under load on loopback.

    python bench/bench_serving.py --repeats 5 --duration 15 --clients 4

Part 1 times one predict call of the default MNIST-sized DECNet (d-500-500-2000-10, 10 clusters,
untrained weights: speed does not depend on them) at batch 1, 64 and 4096, PyTorch eager against
onnxruntime sessions (the one `serving.onnx_pyfunc.open_session` ships, and variants of the session
options), interleaved within each repeat together with a fresh fp32 matmul peak. Part 2 logs and
registers the model with `serving.model_io.log_dec_model` in a temporary sqlite store, starts
`mlflow models serve` and sends `dataframe_split` requests from concurrent keep-alive clients.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import torch
from mlflow.models.cli import commands as models_cli

from _report import machine, matmul_peak_gflops, median, write_section
from dec_mlflow.export import export_onnx
from dec_mlflow.model import Autoencoder, DECNet
from serving.model_io import log_dec_model
from serving.onnx_pyfunc import open_session

DIMS, N_CLUSTERS = (784, 500, 500, 2000, 10), 10
BATCHES = (1, 64, 4096)
CALL_SECONDS = 1.0  # time budget of one timing: thousands of calls at batch 1, a few at batch 4096
MAX_CALLS = 1_000_000
REQUEST_ROWS = (1, 256)
# Request body formats: "inputs" (a list of rows, parsed straight into the tensor) and
# "dataframe_split" (parsed into a DataFrame column by column first).
FORMATS = ("inputs", "dataframe_split")
MAX_REQUESTS_PER_CLIENT = 1_000_000
PING_TIMEOUT, REQUEST_TIMEOUT = 180.0, 60.0
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin holds mlflow and uvicorn
# Encoder matmuls only; input scaling (sub, mul) and squared distances to the centroids add this much.
ENCODER_FLOPS = 2 * sum(a * b for a, b in zip(DIMS[:-1], DIMS[1:]))
HEAD_FLOPS = 2 * DIMS[0] + 3 * N_CLUSTERS * DIMS[-1]


def mnist_like(n_rows: int, seed: int = 0) -> np.ndarray:
    """Integer pixels 0..255, ~19% non-zero as in MNIST: (n_rows, 784) int64."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, (n_rows, DIMS[0])) * (rng.random((n_rows, DIMS[0])) < 0.19)


def untrained_network() -> DECNet:
    torch.manual_seed(0)
    encoder = Autoencoder(DIMS).encoder
    return DECNet(encoder, torch.randn(N_CLUSTERS, DIMS[-1]), torch.zeros(DIMS[0]), torch.full((DIMS[0],), 1 / 255)).eval()


def cpu_session(path: str, threads: int, spinning: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def seconds_per_call(call) -> float:
    """Mean wall time of ``call()`` over a ~CALL_SECONDS window."""
    calls, start = 0, time.perf_counter()
    while calls < MAX_CALLS and time.perf_counter() - start < CALL_SECONDS:
        call()
        calls += 1
    return (time.perf_counter() - start) / calls


def bench_predict(network: DECNet, onnx_path: str, repeats: int) -> tuple[dict, list[float], str]:
    """Seconds per call {(variant, batch): [per repeat]}, fp32 peaks per repeat, the shipped session's settings."""
    shipped = open_session(onnx_path, "auto")
    cores = os.cpu_count()
    sessions = {"onnx shipped": shipped, f"onnx intra_op={cores}": cpu_session(onnx_path, cores),
                "onnx intra_op=1": cpu_session(onnx_path, 1), f"onnx intra_op={cores} no-spin": cpu_session(onnx_path, cores, False)}

    def torch_call(x):
        with torch.inference_mode():
            network(x)

    x = mnist_like(max(BATCHES)).astype(np.float32)
    calls = {}
    for b in BATCHES:
        x_np, x_t = x[:b], torch.from_numpy(x[:b])
        calls[("torch eager", b)] = lambda x_t=x_t: torch_call(x_t)
        for name, s in sessions.items():
            calls[(name, b)] = lambda s=s, x_np=x_np: s.run(["q", "labels"], {"x": x_np})
    for call in calls.values():  # warm-up: thread pools, allocators, oneDNN/MLAS kernels
        call()
    times, peaks = {key: [] for key in calls}, []
    for r in range(repeats):
        peaks.append(matmul_peak_gflops())
        for key in calls if r % 2 == 0 else reversed(calls):  # alternate the order against drift
            times[key].append(seconds_per_call(calls[key]))
        print(f"repeat {r + 1}: fp32 peak {peaks[-1]:.0f} GFLOP/s; " + ", ".join(
            f"{v} b{b} {times[(v, b)][-1] * 1e3:.3f} ms" for v, b in times), flush=True)
    options = shipped.get_session_options()
    return times, peaks, (f"provider {shipped.get_providers()[0]}, intra_op_num_threads={options.intra_op_num_threads} "
                          f"(0 = ORT's choice), {options.graph_optimization_level.name}")


def predict_table(times: dict, peak: float) -> tuple[list[str], dict]:
    lines = ["| batch | variant | ms/call | rows/s | GFLOP/s | of fp32 peak | ONNX speed-up vs torch |", "|---|---|---|---|---|---|---|"]
    med = {key: median(t) for key, t in times.items()}
    for (variant, b), t in med.items():
        gflops = b * ENCODER_FLOPS / t / 1e9
        speedup = "" if variant == "torch eager" else f"{med[('torch eager', b)] / t:.2f}x"
        lines.append(f"| {b} | {variant} | {t * 1e3:.3f} | {b / t:,.0f} | {gflops:.1f} | {gflops / peak:.0%} | {speedup} |")
    return lines, med


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mib(root: int) -> tuple[float, int]:
    """Summed VmRSS (MiB) and count of ``root`` and all its descendant processes, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            children.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))  # fields: state ppid
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
    pids, kib = [root], 0
    for pid in pids:  # grows as descendants are found; /proc holds finitely many
        pids += children.get(pid, [])
        try:
            kib += next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return kib / 1024, len(pids)


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def client(port: int, bodies: list[bytes], deadline: float) -> tuple[list[float], int]:
    """Keep-alive POSTs until ``deadline``: latencies (s) of the successful ones and an error count."""
    conn, latencies, errors = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT), [], 0
    for i in range(MAX_REQUESTS_PER_CLIENT):
        if time.perf_counter() >= deadline:
            break
        start = time.perf_counter()
        try:
            ok = post(conn, bodies[i % len(bodies)])[0] == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()  # the next request reconnects
        if ok:
            latencies.append(time.perf_counter() - start)
        errors += not ok
    conn.close()
    return latencies, errors


def request_body(fmt: str, x: np.ndarray) -> bytes:
    if fmt == "inputs":
        return json.dumps({"inputs": x.tolist()}).encode()
    return json.dumps({"dataframe_split": {"columns": [f"x{j}" for j in range(x.shape[1])], "data": x.tolist()}}).encode()


def load(port: int, fmt: str, rows: int, clients: int, seconds: float) -> dict:
    bodies = [request_body(fmt, mnist_like(rows, seed)) for seed in range(8)]
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)) as conn:  # warm-up and check
        for body in bodies[:3]:
            status, reply = post(conn, body)
            if status != 200 or len(json.loads(reply)["predictions"]) != rows:
                raise RuntimeError(f"server answered {status}: {reply[:300]!r}")
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, [port] * clients, [bodies] * clients, [start + seconds] * clients))
    wall = time.perf_counter() - start
    latencies = np.array([t for lat, _ in results for t in lat]) * 1e3
    return {"format": fmt, "rows": rows, "requests": len(latencies), "rps": len(latencies) / wall, "rows_s": rows * len(latencies) / wall,
            "p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
            "errors": sum(e for _, e in results), "bytes": len(bodies[0])}


def bench_server(network: DECNet, tmp: Path, clients: int, seconds: float) -> tuple[list[dict], dict]:
    """Log, register and serve the model; load it with 1-row then 256-row requests."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    experiment = mlflow.create_experiment("bench-serving", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info, _ = log_dec_model(network, mnist_like(1000), registered_model_name="dec-bench")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    port, log = free_port(), tmp / "serve.log"
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/dec-bench/{info.registered_model_version}",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.perf_counter()
        while True:
            try:
                with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=5)) as conn:
                    conn.request("GET", "/ping")
                    if conn.getresponse().status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - start > PING_TIMEOUT:
                raise RuntimeError(f"server did not answer /ping (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        server = {"startup_s": time.perf_counter() - start, "idle": tree_rss_mib(proc.pid)}
        print(f"server up in {server['startup_s']:.1f} s; RSS {server['idle'][0]:.0f} MiB over {server['idle'][1]} processes", flush=True)
        results = []
        for fmt in FORMATS:
            for rows in REQUEST_ROWS:
                results.append(load(port, fmt, rows, clients, seconds) | {"rss": tree_rss_mib(proc.pid)})
            print(results[-1], flush=True)
        return results, server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats of part 1 (default 5)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per serving scenario (default 15)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads (default 4)")
    ap.add_argument("--skip-serve", action="store_true", help="run part 1 only")
    args = ap.parse_args()
    load, network = os.getloadavg()[0], untrained_network()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        onnx_path = str(tmp / "dec.onnx")
        export_onnx(network, onnx_path, mnist_like(256))
        times, peaks, shipped = bench_predict(network, onnx_path, args.repeats)
        served = None if args.skip_serve else bench_server(network, tmp, args.clients, args.duration)
    peak = median(peaks)
    lines, med = predict_table(times, peak)
    speedup_1 = med[("torch eager", 1)] / med[("onnx shipped", 1)]
    fraction_4096 = 4096 * ENCODER_FLOPS / med[("onnx shipped", 4096)] / 1e9 / peak
    command = f"python bench/bench_serving.py --repeats {args.repeats} --duration {args.duration:g} --clients {args.clients}"
    body = [
        f"Command: `{command}{' --skip-serve' if args.skip_serve else ''}`\n",
        f"Machine: {machine()}, onnxruntime {ort.__version__}, mlflow {mlflow.__version__}. Load average at the start "
        f"{load:.1f} on {os.cpu_count()} cores: absolute figures are noisy; compare rows measured side by side.\n",
        "**Predict call.** Default MNIST-sized DECNet (784-500-500-2000-10, 10 clusters) with untrained random "
        "weights (speed does not depend on them), MNIST-like 0..255 inputs. PyTorch eager = `network(x)` under "
        "`torch.inference_mode()` on a float32 tensor; ONNX = `session.run(['q', 'labels'], {'x': x})`. "
        f"'onnx shipped' is `open_session(path, 'auto')` as the pyfunc uses it ({shipped}); the other ONNX "
        "rows are CPU sessions with the options named. Each figure is the median over "
        f"{args.repeats} repeats of the mean time per call over a ~{CALL_SECONDS:g} s window; all rows and a "
        f"fresh fp32 matmul peak (2048^3, median {peak:.0f} GFLOP/s) are interleaved within each repeat. "
        f"GFLOP/s counts the encoder matmuls, {ENCODER_FLOPS / 1e6:.2f} MFLOP/row; the input scaling and the "
        f"soft-assignment head ({HEAD_FLOPS / 1e3:.1f} kFLOP/row) are not counted.\n",
        *lines, "",
        f"- ONNX speed-up >= 2x at batch 1: {met(speedup_1 >= 2)} ({speedup_1:.2f}x).",
        f"- ONNX at batch 4096 >= 60% of the fp32 matmul peak: {met(fraction_4096 >= 0.6)} "
        f"({fraction_4096 * peak:.0f} of {peak:.0f} GFLOP/s = {fraction_4096:.0%}).",
    ]
    if max(b * ENCODER_FLOPS / t / 1e9 for (_, b), t in med.items()) > peak:
        body.append("- Some rows exceed the measured peak: torch's 2-thread matmul loses more to the other load than "
                    "they do, so under this load the peak understates what the cores can do.")
    if served:
        results, server = served
        workers = next(p for p in models_cli.commands["serve"].params if p.name == "workers")
        body += [
            "", f"**Served model.** `log_dec_model` into a temporary sqlite store, registered, served with `mlflow models "
            f"serve -m models:/dec-bench/1 --env-manager local -h 127.0.0.1` (option `{'/'.join(workers.opts)}`, env "
            f"{workers.envvar}={os.environ.get(workers.envvar, 'unset')} here: \"{workers.help}\"). Up in {server['startup_s']:.1f} s; idle server RSS "
            f"{server['idle'][0]:.0f} MiB summed over its {server['idle'][1]} processes. {args.clients} client threads "
            f"in this process, each with a keep-alive http.client connection, POST `inputs` bodies (a list of rows) "
            f"and `dataframe_split` bodies (784 named columns), integer pixels, for {args.duration:g} s per scenario "
            "after 3 warm-up requests. Latency "
            "is per request as the client sees it, over all clients.\n",
            "| format | rows/request | body (kB) | requests | requests/s | rows/s | p50 (ms) | p99 (ms) | errors | server RSS after (MiB) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *(f"| {r['format']} | {r['rows']} | {r['bytes'] / 1e3:.1f} | {r['requests']} | {r['rps']:.1f} | {r['rows_s']:,.0f} | "
              f"{r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} | {r['rss'][0]:.0f} |" for r in results), "",
            *(f"- 1-row `{r['format']}` p50 <= 10 ms: {met(r['p50'] <= 10)} ({r['p50']:.1f} ms); p99 <= 50 ms: "
              f"{met(r['p99'] <= 50)} ({r['p99']:.1f} ms)." for r in results if r["rows"] == 1),
            f"- No errors: {met(sum(r['errors'] for r in results) == 0)} ({sum(r['errors'] for r in results)}).",
        ]
    text = "\n".join(body)
    print(text)
    write_section("Serving speed", text)


if __name__ == "__main__":
    main()
