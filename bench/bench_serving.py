"""Serving speed, load and abuse: predict call, request path, servers side by side, oversized bodies, soak.

    PYTHONPATH=. python bench/bench_serving.py --repeats 3 --duration 10 --clients 4 --soak 300

(PYTHONPATH=. so that this checkout's `serving` and `dec_mlflow` are imported.) Five parts, each
printed and written to BENCHMARKS.md ("Serving speed" for 1-2, "Serving under load and abuse" for 3-5):

1. One predict call of the default MNIST-sized DECNet (d-500-500-2000-10, 10 clusters, untrained
   weights: speed does not depend on them) at batch 1, 64 and 4096, PyTorch eager against onnxruntime
   sessions, interleaved within each repeat together with a fresh fp32 matmul peak.
2. Where a 1-row `inputs` request spends its time in-process: MLflow's scoring code
   (`scoring_server.invocations`, as `mlflow models serve` runs it) stage by stage, against
   `serving.server.ScoringApp.score`.
3. The model logged and registered with `serving.model_io.log_dec_model` in a temporary sqlite
   store, served by each server configuration in turn (`mlflow models serve` as before, with its
   knobs, and `python -m serving.server`), loaded by concurrent keep-alive client processes; the
   configurations take turns within each repeat, in alternating order.
4. An oversized body (`--abuse-rows` rows of `inputs`) sent to `mlflow models serve` and to
   `serving.server`: time to the answer, and server memory before, at the peak and after.
5. A soak of the default `serving.server` with 1-row `inputs` requests (`--soak` seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import multiprocessing
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import threading
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import torch
from mlflow.pyfunc import scoring_server
from mlflow.utils.proto_json_utils import parse_tf_serving_input

from _report import machine, matmul_peak_gflops, median, write_section
from dec_mlflow.export import export_onnx
from dec_mlflow.model import Autoencoder, DECNet
from serving.model_io import log_dec_model
from serving.loading import load_dec_model
from serving.onnx_pyfunc import check_batch, open_session
from serving.server import ScoringApp, encode_predictions

DIMS, N_CLUSTERS = (784, 500, 500, 2000, 10), 10
BATCHES = (1, 64, 4096)
CALL_SECONDS = 1.0  # time budget of one timing: thousands of calls at batch 1, a few at batch 4096
MAX_CALLS = 1_000_000
# (format, rows per request): "inputs" (a list of rows) and "dataframe_split" (784 named columns)
SCENARIOS = (("inputs", 1), ("inputs", 256), ("dataframe_split", 1))
MAX_REQUESTS_PER_CLIENT = 1_000_000
PING_TIMEOUT, REQUEST_TIMEOUT, ABUSE_TIMEOUT = 180.0, 60.0, 600.0
DEFAULT_SERVERS = ["mlflow", "mlflow-w2", "dec-w1", "dec"]
WARM_UP_SECONDS = 3.0  # of 1-row load after a server starts, not measured
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin holds mlflow and uvicorn
REPO = Path(__file__).resolve().parents[1]
JSON = "application/json"
# name -> (description, how it is started); {uri} and {port} are filled in. Each runs in the same environment.
SERVERS = {
    "mlflow": ("`mlflow models serve` as before: 1 worker, h11 HTTP parser, asyncio loop (what uvicorn picked before "
               "httptools was installed)", "mlflow", {"UVICORN_HTTP": "h11", "UVICORN_LOOP": "asyncio"}),
    "mlflow-w2": ("`mlflow models serve --workers 2` with httptools/uvloop and "
                  "`MLFLOW_PYFUNC_INFERENCE_CONFIG='{\"intra_op_threads\": 1}'`: its knobs turned as far as they go",
                  "mlflow-w2", {"MLFLOW_PYFUNC_INFERENCE_CONFIG": '{"intra_op_threads": 1}'}),
    "mlflow-httptools": ("`mlflow models serve`, 1 worker, with httptools and uvloop (what uvicorn picks when they are "
                         "installed)", "mlflow", {}),
    "mlflow-w2-h11": ("`mlflow models serve --workers 2` with h11 and asyncio (a fresh install without httptools/uvloop) "
                      "and one onnxruntime thread per worker", "mlflow-w2",
                      {"UVICORN_HTTP": "h11", "UVICORN_LOOP": "asyncio", "MLFLOW_PYFUNC_INFERENCE_CONFIG": '{"intra_op_threads": 1}'}),
    "dec-h11": ("`python -m serving.server --http h11 --loop asyncio` (what a fresh install without httptools/uvloop runs)",
                "dec-h11", {}),
    "dec-w1": ("`python -m serving.server -w 1` (2 onnxruntime threads)", "dec-w1", {}),
    "dec": ("`python -m serving.server` (defaults: 2 workers, 1 onnxruntime thread each, 16 MiB body limit)", "dec", {}),
}
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


def request_body(fmt: str, x: np.ndarray) -> bytes:
    if fmt == "inputs":
        return json.dumps({"inputs": x.tolist()}).encode()
    return json.dumps({"dataframe_split": {"columns": [f"x{j}" for j in range(x.shape[1])], "data": x.tolist()}}).encode()


# ------------------------------------------------------------------ part 2: the request path in-process
def bench_request_path(model_uri: str, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each stage of a 1-row `inputs` request, {stage: [per repeat]}."""
    mlflow_model = mlflow.pyfunc.load_model(model_uri)  # as `mlflow models serve` loads it
    schema = mlflow_model.metadata.get_input_schema()
    app = ScoringApp(load_dec_model(model_uri), 2**24, 60.0)
    body = request_body("inputs", mnist_like(1))
    decoded = json.loads(body)
    x = parse_tf_serving_input(decoded, schema)
    frame = mlflow_model.predict(x)
    arrays = app.python_model.predict_arrays(check_batch(x, n_features=DIMS[0], max_batch_rows=10))
    stages = {
        "mlflow: scoring_server.invocations, whole request": lambda: scoring_server.invocations(body, JSON, mlflow_model, schema),
        "mlflow: json.loads": lambda: json.loads(body),
        "mlflow: parse `inputs` (parse_tf_serving_input, deep copy)": lambda: parse_tf_serving_input(decoded, schema),
        "mlflow: PyFuncModel.predict -> DataFrame": lambda: mlflow_model.predict(x),
        "mlflow: DataFrame -> JSON (predictions_to_json)": lambda: scoring_server.predictions_to_json(frame, io.StringIO()),
        "serving.server: ScoringApp.score, whole request": lambda: app.score(body, JSON),
        "serving.server: check_batch + predict_arrays": lambda: app.python_model.predict_arrays(
            check_batch(x, n_features=DIMS[0], max_batch_rows=10)),
        "serving.server: encode_predictions": lambda: encode_predictions(*arrays),
        "onnxruntime session.run alone": lambda: app.python_model.session.run(["q", "labels"], {"x": x.astype(np.float32)}),
    }
    for call in stages.values():
        call()
    times = {name: [] for name in stages}
    for r in range(repeats):
        for name in stages if r % 2 == 0 else reversed(stages):
            times[name].append(seconds_per_call(stages[name]))
    return times


# ------------------------------------------------------------------ parts 3-5: servers on loopback
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
    conn.request("POST", "/invocations", body, {"Content-Type": JSON})
    response = conn.getresponse()
    return response.status, response.read()


def client(port: int, bodies: list[bytes], start: float, deadline: float) -> tuple[list[tuple[float, float]], int]:
    """Keep-alive POSTs until ``deadline``: (seconds since ``start``, latency) of each success, and an error count."""
    conn, latencies, errors = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT), [], 0
    for i in range(MAX_REQUESTS_PER_CLIENT):
        sent = time.time()
        if sent >= deadline:
            break
        try:
            ok = post(conn, bodies[i % len(bodies)])[0] == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()  # the next request reconnects
        if ok:
            latencies.append((sent - start, time.time() - sent))
        errors += not ok
    conn.close()
    return latencies, errors


def load(port: int, fmt: str, rows: int, clients: int, seconds: float, pool) -> dict:
    """``clients`` client processes of ``pool`` POST ``fmt`` bodies of ``rows`` rows for ``seconds``."""
    bodies = [request_body(fmt, mnist_like(rows, seed)) for seed in range(8)]
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)) as conn:  # warm-up and check
        for body in bodies[:3]:
            status, reply = post(conn, body)
            if status != 200 or len(json.loads(reply)["predictions"]) != rows:
                raise RuntimeError(f"server answered {status}: {reply[:300]!r}")
    load_before, start = os.getloadavg()[0], time.time() + 0.5  # wall clock: shared with the client processes
    results = pool.starmap(client, [(port, bodies, start, start + seconds)] * clients)
    samples = np.array([t for lat, _ in results for t in lat]).reshape(-1, 2)  # (requests, [t, latency])
    latencies = samples[:, 1] * 1e3
    return {"format": fmt, "rows": rows, "requests": len(latencies), "rps": len(latencies) / seconds,
            "p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
            "errors": sum(e for _, e in results), "bytes": len(bodies[0]), "load": (load_before, os.getloadavg()[0]),
            "samples": samples}


@contextlib.contextmanager
def running_server(kind: str, model_uri: str, env: dict, log: Path):
    """(process, port) of a server of ``kind`` answering /ping; stopped (whole process group) on exit."""
    port = free_port()
    if kind.startswith("mlflow"):
        cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
        cmd += ["--workers", "2"] if kind.startswith("mlflow-w2") else []
    else:
        cmd = [sys.executable, "-m", "serving.server", "-m", model_uri, "-h", "127.0.0.1", "-p", str(port)]
        cmd += {"dec-w1": ["--workers", "1"], "dec-h11": ["--http", "h11", "--loop", "asyncio"]}.get(kind, [])
    full_env = {**os.environ, **env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.perf_counter()
        while not ping(port):
            if proc.poll() is not None or time.perf_counter() - start > PING_TIMEOUT:
                raise RuntimeError(f"{kind} did not answer /ping (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        # /ping is answered by the first worker ready; wait until the others have loaded too (memory settles)
        previous = tree_rss_mib(proc.pid)[0]
        for _ in range(60):
            time.sleep(1.0)
            current = tree_rss_mib(proc.pid)[0]
            if abs(current - previous) < 2:
                break
            previous = current
        yield proc, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ping(port: int) -> bool:
    try:
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=5)) as conn:
            conn.request("GET", "/ping")
            return conn.getresponse().status == 200
    except OSError:
        return False


def oversized(proc: subprocess.Popen, port: int, rows: int) -> dict:
    """Send one `inputs` body of ``rows`` rows over a raw socket; time to the answer and server memory around it."""
    row = json.dumps(mnist_like(1)[0].tolist()).encode()
    body = b'{"inputs": [' + b", ".join([row] * rows) + b"]}"
    request = (b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # built before the clock starts
    idle = tree_rss_mib(proc.pid)[0]
    peak, answered, reply = [idle], threading.Event(), bytearray()
    sock = socket.create_connection(("127.0.0.1", port), timeout=ABUSE_TIMEOUT)

    def read():  # reading before and while sending: an early answer is seen even if the server then resets
        try:
            while chunk := sock.recv(65536):
                reply.extend(chunk)
                if b"\r\n\r\n" in reply:
                    head, _, rest = bytes(reply).partition(b"\r\n\r\n")
                    length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)
                    if len(rest) >= length:
                        break
        except OSError:
            pass
        answered.set()

    reader = threading.Thread(target=read)
    start = time.perf_counter()
    reader.start()
    try:
        sock.sendall(request)
    except OSError:
        pass  # the server stopped reading: it answered already
    while not answered.wait(0.2):
        peak.append(tree_rss_mib(proc.pid)[0])
        if time.perf_counter() - start > ABUSE_TIMEOUT:
            break
    seconds = time.perf_counter() - start
    sock.close()
    reader.join(5)
    time.sleep(3.0)
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else None
    message = bytes(reply).partition(b"\r\n\r\n")[2][:160].decode("utf-8", "replace")
    return {"rows": rows, "mb": len(body) / 2**20, "status": status, "seconds": seconds, "idle": idle, "peak": max(peak),
            "after": tree_rss_mib(proc.pid)[0], "message": message, "alive": ping(port)}


def log_bench_model(network: DECNet, tmp: Path) -> str:
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    experiment = mlflow.create_experiment("bench-serving", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info, _ = log_dec_model(network, mnist_like(1000), registered_model_name="dec-bench")
    return f"models:/dec-bench/{info.registered_model_version}"


def bench_servers(model_uri: str, tmp: Path, args, pool) -> dict:
    """Load results {server: [per repeat: [per scenario]]}, with startup and idle memory per server."""
    results = {kind: [] for kind in args.servers}
    for r in range(args.repeats):
        for kind in args.servers if r % 2 == 0 else list(reversed(args.servers)):
            with running_server(kind, model_uri, SERVERS[kind][2], tmp / f"{kind}.log") as (proc, port):
                load(port, "inputs", 1, args.clients, WARM_UP_SECONDS, pool)  # every worker connected and warm
                idle = tree_rss_mib(proc.pid)
                runs = [load(port, fmt, rows, args.clients, args.duration, pool) | {"idle": idle, "rss": tree_rss_mib(proc.pid)}
                        for fmt, rows in SCENARIOS]
            results[kind].append(runs)
            print(f"repeat {r + 1} {kind}: " + "; ".join(f"{x['format']} {x['rows']}: p50 {x['p50']:.1f} p99 {x['p99']:.1f} ms, "
                                                         f"{x['rps']:.0f}/s, {x['errors']} errors, load {x['load'][0]:.1f}"
                                                         for x in runs), flush=True)
    return results


def bench_abuse(model_uri: str, tmp: Path, rows: int, pool) -> dict:
    out = {}
    for kind in ("mlflow", "dec"):
        with running_server(kind, model_uri, SERVERS[kind][2], tmp / f"abuse-{kind}.log") as (proc, port):
            load(port, "inputs", 1, 4, WARM_UP_SECONDS, pool)
            out[kind] = oversized(proc, port, rows) | {"load": os.getloadavg()[0]}
        print(f"oversized body to {kind}: {out[kind]}", flush=True)
    return out


def bench_soak(model_uri: str, tmp: Path, seconds: float, clients: int, pool) -> dict:
    loads = []
    with running_server("dec", model_uri, {}, tmp / "soak.log") as (proc, port):
        load(port, "inputs", 1, clients, WARM_UP_SECONDS, pool)
        idle, stop = tree_rss_mib(proc.pid)[0], threading.Event()

        def sample():
            while not stop.wait(10):
                loads.append((os.getloadavg()[0], tree_rss_mib(proc.pid)[0]))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            run = load(port, "inputs", 1, clients, seconds, pool)
        finally:
            stop.set()
            sampler.join()
        run |= {"idle": idle, "after": tree_rss_mib(proc.pid)[0], "samples_load": loads}
    t, latency = run["samples"][:, 0], run["samples"][:, 1] * 1e3
    run["minutes"] = [(m, float(np.percentile(latency[(t >= 60 * m) & (t < 60 * (m + 1))], 50)),
                       float(np.percentile(latency[(t >= 60 * m) & (t < 60 * (m + 1))], 99)))
                      for m in range(int(seconds // 60)) if ((t >= 60 * m) & (t < 60 * (m + 1))).any()]
    print(f"soak: p50 {run['p50']:.1f} ms, p99 {run['p99']:.1f} ms, {run['requests']} requests, {run['errors']} errors", flush=True)
    return run


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


# ------------------------------------------------------------------ report
def predict_section(args, load_start, times, peaks, shipped, path_times) -> str:
    peak = median(peaks)
    lines, med = predict_table(times, peak)
    speedup_1 = med[("torch eager", 1)] / med[("onnx shipped", 1)]
    fraction_4096 = 4096 * ENCODER_FLOPS / med[("onnx shipped", 4096)] / 1e9 / peak
    body = [
        f"Command: `PYTHONPATH=. python bench/bench_serving.py --repeats {args.repeats} ...` (parts 1-2 of the script)\n",
        f"Machine: {machine()}, onnxruntime {ort.__version__}, mlflow {mlflow.__version__}. Load average at the start "
        f"{load_start:.1f} on {os.cpu_count()} cores (the machine is shared with CPU-heavy training): absolute figures "
        "are noisy; compare rows measured side by side.\n",
        "**Predict call.** Default MNIST-sized DECNet (784-500-500-2000-10, 10 clusters) with untrained random "
        "weights (speed does not depend on them), MNIST-like 0..255 inputs. PyTorch eager = `network(x)` under "
        "`torch.inference_mode()` on a float32 tensor; ONNX = `session.run(['q', 'labels'], {'x': x})`. "
        f"'onnx shipped' is `open_session(path, 'auto')` as the pyfunc uses it ({shipped}); the other ONNX "
        "rows are CPU sessions with the options named. Each figure is the median over "
        f"{args.repeats} repeats of the mean time per call over a ~{CALL_SECONDS:g} s window; all rows and a "
        f"fresh fp32 matmul peak (2048^3, median {peak:.0f} GFLOP/s) are interleaved within each repeat. "
        f"GFLOP/s counts the encoder matmuls, {ENCODER_FLOPS / 1e6:.2f} MFLOP/row.\n",
        *lines, "",
        f"- ONNX speed-up >= 2x at batch 1: {met(speedup_1 >= 2)} ({speedup_1:.2f}x).",
        f"- ONNX at batch 4096 >= 60% of the fp32 matmul peak: {met(fraction_4096 >= 0.6)} "
        f"({fraction_4096 * peak:.0f} of {peak:.0f} GFLOP/s = {fraction_4096:.0%}).",
    ]
    if path_times:
        whole = median(path_times["mlflow: scoring_server.invocations, whole request"])
        body += ["", "**Where a 1-row `inputs` request goes, in-process** (no HTTP): the registered model loaded as "
                 "`mlflow models serve` loads it, MLflow's `scoring_server.invocations` and its stages, against "
                 "`serving.server.ScoringApp.score` on the same body; medians over the repeats of the mean time per call.\n",
                 "| stage | µs/call | share of MLflow's whole request |", "|---|---|---|",
                 *(f"| {name} | {median(t) * 1e6:.0f} | {median(t) / whole:.0%} |" for name, t in path_times.items())]
    return "\n".join(body)


def load_section(args, model_uri, servers, abuse, soak) -> str:
    command = (f"PYTHONPATH=. python bench/bench_serving.py --parts {args.parts} --repeats {args.repeats} --duration "
               f"{args.duration:g} --clients {args.clients} --abuse-rows {args.abuse_rows} --soak {args.soak:g}")
    if args.servers != DEFAULT_SERVERS or args.section != "Serving under load and abuse":
        command += f" --servers {' '.join(args.servers)} --section \"{args.section}\""
    body = [f"Command: `{command}`\n",
            f"Machine: {machine()}, uvicorn {_version('uvicorn')}, httptools {_version('httptools')}, uvloop {_version('uvloop')}, "
            f"mlflow {mlflow.__version__}. {os.cpu_count()} cores shared with other people's CPU-heavy training: the "
            "load average (1 min) before each measurement is in the tables; the servers take turns within each repeat, in "
            "alternating order, so compare them side by side.\n"]
    if servers:
        body += [f"**Servers side by side.** The default MNIST-sized model, registered in a temporary sqlite store and "
                 f"served from `{model_uri}`. {args.clients} client processes, each with a keep-alive `http.client` "
                 f"connection, POST for {args.duration:g} s per scenario after 3 warm-up requests; latency is per request "
                 f"as the client sees it, over all clients. {args.repeats} repeats; each cell is the median over the "
                 "repeats, with the range in brackets for p50. Servers:\n",
                 *(f"- `{kind}`: {SERVERS[kind][0]}" for kind in servers), "",
                 "| server | format | rows | requests/s | p50 ms [range] | p99 ms | errors | load avg | RSS idle -> after (MiB) |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for kind, repeats in servers.items():
            for i, (fmt, rows) in enumerate(SCENARIOS):
                runs = [rep[i] for rep in repeats]
                p50s = [x["p50"] for x in runs]
                body.append(f"| {kind} | {fmt} | {rows} | {median([x['rps'] for x in runs]):.0f} | {median(p50s):.1f} "
                            f"[{min(p50s):.1f}-{max(p50s):.1f}] | {median([x['p99'] for x in runs]):.1f} | "
                            f"{sum(x['errors'] for x in runs)} | {median([x['load'][0] for x in runs]):.1f} | "
                            f"{median([x['idle'][0] for x in runs]):.0f} -> {median([x['rss'][0] for x in runs]):.0f} |")
        body.append("")
        for kind, repeats in servers.items():
            one = [rep[0] for rep in repeats]
            p50, p99 = median([x["p50"] for x in one]), median([x["p99"] for x in one])
            body.append(f"- `{kind}`, 1-row `inputs`, {args.clients} clients: p50 <= 10 ms {met(p50 <= 10)} ({p50:.1f}); "
                        f"p99 <= 50 ms {met(p99 <= 50)} ({p99:.1f}); errors {sum(x['errors'] for x in one)}.")
        if "mlflow-w2-h11" in servers:
            body.append("- `mlflow-w2-h11`: with several workers uvicorn gives each a listening socket whose `proto` is 0, "
                        "so asyncio does not set TCP_NODELAY on its connections, and each response body waits for the "
                        "client's delayed ACK of the headers (~40 ms). uvloop sets TCP_NODELAY itself; "
                        "`serving.server` sets it on its listening socket, which every connection inherits (`dec-h11` runs without uvloop).")
    if abuse:
        body += ["", f"**Oversized body.** One `inputs` request of {args.abuse_rows:,} MNIST rows "
                 f"({next(iter(abuse.values()))['mb']:.0f} MiB of JSON) over a raw socket that reads while it sends; "
                 "time until the answer arrives; server memory (summed over its processes) before, at the peak "
                 "(sampled every 0.2 s) and 3 s after; whether /ping answers afterwards.\n",
                 "| server | answer | seconds to answer | RSS idle / peak / after (MiB) | answers /ping after | load avg |",
                 "|---|---|---|---|---|---|",
                 *(f"| {kind} | {a['status']} | {a['seconds']:.2f} | {a['idle']:.0f} / {a['peak']:.0f} / {a['after']:.0f} | "
                   f"{'yes' if a['alive'] else '**no**'} | {a['load']:.1f} |" for kind, a in abuse.items()), ""]
        body += [f"- `{kind}` answered: `{a['message'][:150]}`" for kind, a in abuse.items()]
        dec = abuse.get("dec")
        if dec:
            body.append(f"- Refused before parsing in well under a second: {met(dec['status'] == 413 and dec['seconds'] < 1)} "
                        f"({dec['seconds']:.3f} s); memory back to idle: {met(dec['after'] <= dec['idle'] + 20)} "
                        f"({dec['idle']:.0f} -> {dec['after']:.0f} MiB).")
    if soak:
        loads = [x[0] for x in soak["samples_load"]] or [soak["load"][0]]
        body += ["", f"**Soak.** `python -m serving.server` (defaults), 1-row `inputs`, {args.clients} client processes, "
                 f"{args.soak:g} s: {soak['requests']} requests ({soak['rps']:.0f}/s), p50 {soak['p50']:.1f} ms, p99 "
                 f"{soak['p99']:.1f} ms, {soak['errors']} errors; server RSS {soak['idle']:.0f} MiB idle, {soak['after']:.0f} MiB "
                 f"at the end; load average (1 min, every 10 s) {min(loads):.1f} to {max(loads):.1f}, median {median(loads):.1f}.\n",
                 "| minute | p50 ms | p99 ms |", "|---|---|---|", *(f"| {m + 1} | {a:.1f} | {b:.1f} |" for m, a, b in soak["minutes"]), "",
                 f"- Soak: p50 <= 10 ms {met(soak['p50'] <= 10)}, p99 <= 50 ms {met(soak['p99'] <= 50)}, "
                 f"0 errors {met(soak['errors'] == 0)}."]
    return "\n".join(body)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of parts 1-3 (default 3)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load per scenario in part 3 (default 10)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client processes (default 4)")
    ap.add_argument("--servers", nargs="+", default=DEFAULT_SERVERS, choices=list(SERVERS), help="server configurations of part 3")
    ap.add_argument("--abuse-rows", type=int, default=100_001, help="rows of the oversized request of part 4 (default 100,001)")
    ap.add_argument("--soak", type=float, default=300.0, help="seconds of the soak of part 5 (default 300; 0 skips it)")
    ap.add_argument("--parts", default="12345", help="which parts to run, e.g. 345 (default all)")
    ap.add_argument("--section", default="Serving under load and abuse", help="BENCHMARKS.md section of parts 3-5")
    args = ap.parse_args()
    load_start, network = os.getloadavg()[0], untrained_network()
    pool = multiprocessing.get_context("fork").Pool(max(args.clients, 4)) if set(args.parts) & set("345") else None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_uri = log_bench_model(network, tmp)
        if set(args.parts) & set("12"):
            onnx_path = str(tmp / "dec.onnx")
            export_onnx(network, onnx_path, mnist_like(256))
            times, peaks, shipped = bench_predict(network, onnx_path, args.repeats) if "1" in args.parts else (None, None, None)
            path_times = bench_request_path(model_uri, args.repeats) if "2" in args.parts else None
            if times:
                text = predict_section(args, load_start, times, peaks, shipped, path_times)
                print(text)
                write_section("Serving speed", text)
        servers = bench_servers(model_uri, tmp, args, pool) if "3" in args.parts else None
        abuse = bench_abuse(model_uri, tmp, args.abuse_rows, pool) if "4" in args.parts else None
        soak = bench_soak(model_uri, tmp, args.soak, args.clients, pool) if "5" in args.parts and args.soak > 0 else None
    if pool is not None:
        pool.close()
    if servers or abuse or soak:
        text = load_section(args, "models:/dec-bench/1", servers, abuse, soak)
        print(text)
        write_section(args.section, text)


if __name__ == "__main__":
    main()
