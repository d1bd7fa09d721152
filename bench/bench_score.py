"""Batch scoring speed: the `score` engines, local (chunks in this process) and Spark (spark_udf).

    python bench/bench_score.py --rows 700000 --repeats 3 --master "local[2]"

Logs the default MNIST-sized DEC network (784-500-500-2000-10, 10 clusters, untrained random weights:
speed does not depend on them) with `serving.model_io.log_dec_model` into a temporary sqlite store,
writes MNIST-like inputs (integer pixels 0..255, ~19% non-zero) as a parquet file (uint8 columns,
row groups of 50,000 rows) and a uint8 `.npy`, then scores the parquet with both engines and the
`.npy` with the local engine, interleaved within every repeat. One Spark session is started before the timings and reused (its start-up is
reported apart). Each timing is `dec_mlflow.scoring.execute`: reading, scoring and writing the
output, excluding model loading. The two engines' parquet outputs are compared on every repeat.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from _report import machine, median, write_section
from bench_serving import DIMS, mnist_like, untrained_network
from dec_mlflow import scoring
from serving.model_io import log_dec_model

ROW_GROUP = 50_000
# (engine, input) timed side by side. Spark on .npy is left out: Spark cannot read .npy, and its
# driver-side copy into parquet would dominate; the Spark figure is on parquet, which Spark reads.
CASES = (("local", "parquet"), ("spark", "parquet"), ("local", "npy"))


def write_inputs(folder: Path, n_rows: int) -> dict[str, Path]:
    """The same rows as parquet (uint8 columns x0..x783) and .npy (uint8), written chunk by chunk."""
    paths = {"parquet": folder / "mnist_like.parquet", "npy": folder / "mnist_like.npy"}
    npy = np.lib.format.open_memmap(paths["npy"], mode="w+", dtype=np.uint8, shape=(n_rows, DIMS[0]))
    names = [f"x{j}" for j in range(DIMS[0])]
    with pq.ParquetWriter(paths["parquet"], pa.schema([(n, pa.uint8()) for n in names])) as writer:
        for i, start in enumerate(range(0, n_rows, ROW_GROUP)):
            x = mnist_like(min(ROW_GROUP, n_rows - start), seed=i).astype(np.uint8)
            npy[start:start + len(x)] = x
            writer.write_table(pa.table({n: x[:, j] for j, n in enumerate(names)}))
    npy.flush()
    del npy
    return paths


def compare(local: Path, spark: Path) -> tuple[bool, float]:
    """(labels identical, max |dq|) between a local output file and a Spark output directory, by row."""
    a = pd.read_parquet(local)
    b = pd.read_parquet(spark).sort_values("row").reset_index(drop=True)
    q = [c for c in a.columns if c.startswith("q_")]
    return bool((a["row"].to_numpy() == b["row"].to_numpy()).all() and (a["label"].to_numpy() == b["label"].to_numpy()).all()), \
        float(np.abs(a[q].to_numpy() - b[q].to_numpy()).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=700_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--chunk_rows", type=int, default=scoring.DEFAULT_CHUNK_ROWS)
    parser.add_argument("--workdir", default=None, help="Folder for the inputs and outputs (default: a temporary one).")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-score-", dir=args.workdir))
    try:
        mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
        experiment = mlflow.create_experiment("bench-score", artifact_location=(work / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            log_dec_model(untrained_network(), mnist_like(2000).astype(np.float64), registered_model_name="dec-bench-score",
                          max_batch_rows=max(args.chunk_rows, 100_000))
        model_uri = "models:/dec-bench-score/1"
        started = time.perf_counter()
        inputs = write_inputs(work, args.rows)
        sizes = {k: p.stat().st_size / 2**20 for k, p in inputs.items()}
        print(f"inputs written in {time.perf_counter() - started:.0f} s: " + ", ".join(
            f"{k} {size:,.0f} MiB" for k, size in sizes.items()), flush=True)

        started = time.perf_counter()
        spark, _ = scoring.spark_session(args.master, args.chunk_rows)
        spark_start = time.perf_counter() - started
        spark_info = (f"Spark {spark.version}, master `{spark.sparkContext.master}` (default parallelism "
                      f"{spark.sparkContext.defaultParallelism}), driver memory "
                      f"{spark.sparkContext.getConf().get('spark.driver.memory', '1g (default)')}, Java "
                      f"{spark.sparkContext._jvm.java.lang.System.getProperty('java.version')}")
        print(f"{spark_info}; session started in {spark_start:.1f} s", flush=True)

        seconds: dict[tuple[str, str], list[float]] = {case: [] for case in CASES}
        agreement = []
        for r in range(args.repeats):
            keys = list(seconds) if r % 2 == 0 else list(reversed(seconds))  # alternate the order against drift
            outputs = {}
            for engine, kind in keys:
                out = work / f"out-{engine}-{kind}-{r}.parquet"
                job = scoring.plan(model_uri, inputs[kind], out, engine=engine, chunk_rows=args.chunk_rows)
                result = scoring.execute(job)
                assert result.n_rows == args.rows
                seconds[(engine, kind)].append(result.seconds)
                outputs[(engine, kind)] = out
                print(f"repeat {r + 1}: {engine:5s} {kind:7s} {result.seconds:6.1f} s  {result.rows_per_second:9,.0f} rows/s", flush=True)
            agreement.append(compare(outputs[("local", "parquet")], outputs[("spark", "parquet")]))
            for out in outputs.values():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            # after every repeat, so that a run cut short leaves the repeats it completed
            report(args, seconds, agreement, sizes, spark_info, spark_start, load_at_start)
        spark.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(args, seconds: dict, agreement: list, sizes: dict, spark_info: str, spark_start: float, load: float) -> None:
    """Print and write the BENCHMARKS.md section for the repeats completed so far."""
    import onnxruntime

    lines = ["| engine | input | median s | rows/s (median) | slowest / fastest s | speed vs local parquet |", "|---|---|---|---|---|---|"]
    for (engine, kind), times in seconds.items():
        ratio = median(seconds[("local", "parquet")]) / median(times)
        lines.append(f"| {engine} | {kind} | {median(times):.1f} | {args.rows / median(times):,.0f} | "
                     f"{max(times):.1f} / {min(times):.1f} | {ratio:.2f}x |")
    labels_equal = all(a for a, _ in agreement)
    max_dq = max(d for _, d in agreement)
    body = f"""Command: `python bench/bench_score.py --rows {args.rows} --repeats {args.repeats} --master "{args.master}"`

Machine: {machine()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, mlflow {mlflow.__version__}, Python {platform.python_version()}. Load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} after the last repeat, on {os.cpu_count()} cores (other jobs shared the machine): compare rows measured side by side.

What is timed: `dec_mlflow.scoring.execute` of a `score` job, i.e. reading the input, scoring every row and writing the output parquet, model loading excluded. {args.rows:,} MNIST-like rows (784 integer pixels 0..255, ~19% non-zero), default DEC network 784-500-500-2000-10 with 10 clusters and untrained random weights (speed does not depend on them), logged with `log_dec_model`; chunk_rows {args.chunk_rows:,}. Inputs: parquet with 784 uint8 columns in row groups of {ROW_GROUP:,} rows ({sizes['parquet']:,.0f} MiB), and a uint8 `.npy` ({sizes['npy']:,.0f} MiB). Medians over {len(agreement)} completed repeats (of {args.repeats} asked for), the three cases interleaved in every repeat (order reversed every other repeat).

Spark: {spark_info}; Python workers run this interpreter, `mlflow.pyfunc.spark_udf(..., env_manager="local")`, Arrow batches of {args.chunk_rows:,} rows. The session was started once ({spark_start:.1f} s, not in the figures) and reused, so the first repeat's Spark job also pays the JVM's warm-up.

{chr(10).join(lines)}

- Agreement of the two engines on every repeat, compared by row: labels identical {'yes' if labels_equal else '**NO**'}, max |dq| {max_dq:.1e} (requirement: identical labels, |dq| <= 1e-6).
- Where Spark's time goes on one machine: the JVM reads the 784 parquet columns and builds the features column, ships Arrow batches to two Python workers (local[2]), each of which converts them to a float32 matrix and runs its own onnxruntime session, which by default also asks for both cores. On 2 cores that is overhead around the same model calls; the Spark engine is for data and clusters beyond one machine (`spark_master` pointing at the cluster), the local engine for one machine.
"""
    print(body)
    write_section("Batch scoring (`score`): local and Spark engines", body)


if __name__ == "__main__":
    main()
