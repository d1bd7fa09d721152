"""Batch scoring: a logged DEC pyfunc over a .parquet, .csv or .npy file, into a parquet of predictions.

Reads a model URI (``models:/name@alias``, ``models:/name/version``, ``runs:/<id>/model``) and an
input file of raw features, one row per sample; writes one row per input row with the input's key,
``label`` (int64) and ``q_0 .. q_{k-1}`` (float64). Two engines compute the same numbers:

- ``local``: this process, chunk by chunk, never the whole input at once: a parquet file is read
  in record batches of at most ``chunk_rows`` rows (pyarrow reads one row group at a time), a
  ``.npy`` through a memory map, a CSV with pandas in chunks. The output is one parquet file, rows
  in input order.
- ``spark``: ``mlflow.pyfunc.spark_udf`` on a Spark session (``local[*]`` unless a master is given
  or ``SPARK_MASTER`` is set). Spark reads parquet itself; a CSV or ``.npy`` input is first copied,
  chunk by chunk, into a temporary parquet beside the output. The output is a parquet directory of
  part files (``pandas.read_parquet`` and ``spark.read.parquet`` read it whole); row order is
  Spark's, so join on the key.

The key: a table (parquet, CSV) whose column named ``id_column`` (default ``id``) exists carries
that column to the output unchanged; every other column is a feature. Without such a column, and
always for ``.npy``, the key is ``row``, the 0-based position of the row in the input file.

This module imports mlflow and, for the spark engine only, pyspark. The local engine loads the model
with ``serving.loading`` (no code stored with the model runs); ``spark_udf`` loads it in each
executor with ``mlflow.pyfunc.load_model``, which runs the model's logged ``onnx_pyfunc.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dec_mlflow.environment import temporary_environ

ENGINES = ("local", "spark")
FORMATS = (".parquet", ".csv", ".npy")
ROW_COLUMN = "row"  # the key when the input has no id column: position of the row in the input
DEFAULT_CHUNK_ROWS = 10_000  # also Arrow's default batch for Spark pandas UDFs
DEFAULT_SPARK_MASTER = "local[*]"
_CSV_PROBE_ROWS = 1000


@dataclass(frozen=True)
class ScoringInput:
    """An input file checked for scoring (see ``open_input``).

    Attributes
    ----------
    path : Path
    kind : {'parquet', 'csv', 'npy'}
    features : tuple of str
        Feature column names in input order (``npy``: none, the array's columns are taken in order).
    key : str
        Output key column: the input's id column, or ``row``.
    has_id : bool
        Whether ``key`` is a column of the input (else row positions are generated).
    n_features : int
    n_rows : int or None
        None for CSV (known only after reading it).
    """

    path: Path
    kind: str
    features: tuple[str, ...]
    key: str
    has_id: bool
    n_features: int
    n_rows: int | None


@dataclass(frozen=True)
class ScoringModel:
    """A loaded DEC pyfunc and what scoring needs to know about it."""

    uri: str
    pyfunc: object  # mlflow.pyfunc.PyFuncModel
    n_features: int
    n_clusters: int
    max_batch_rows: int


@dataclass(frozen=True)
class ScoreResult:
    """What ``score_file`` did: rows scored, rows per cluster, wall time, engine and Spark master."""

    output: Path
    n_rows: int
    cluster_sizes: list[int]
    seconds: float
    engine: str
    spark_master: str | None = None

    @property
    def rows_per_second(self) -> float:
        return self.n_rows / self.seconds if self.seconds > 0 else float("inf")


# ------------------------------------------------------------------------------------ inputs
def open_input(path: str | os.PathLike, id_column: str = "id") -> ScoringInput:
    """Check an input file and describe it: format, feature columns, key, size.

    Reads the parquet footer, the ``.npy`` header, or the first 1,000 rows of a CSV (to refuse a
    non-numeric column before any work; later chunks are checked as they are read).

    Raises
    ------
    ValueError
        If the file does not exist, its extension is not one of .parquet/.csv/.npy, a ``.npy`` is
        not a 2-D numeric array, or ``id_column`` names an output column (``label``, ``q_<j>``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input {str(path)!r}: no such file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"input {str(path)!r}: format {suffix or '(none)'!r} is not supported; give a {', '.join(FORMATS)} file")
    if id_column == "label" or re.fullmatch(r"q_\d+", id_column or ""):
        raise ValueError(f"id_column {id_column!r} would collide with an output column (label, q_<j>); rename it")
    if suffix == ".npy":
        x = np.load(path, mmap_mode="r")
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"input {str(path)!r}: expected a 2-D numeric array; got shape {x.shape}, dtype {x.dtype}")
        return ScoringInput(path, "npy", (), ROW_COLUMN, False, x.shape[1], x.shape[0])
    if suffix == ".parquet":
        try:
            meta = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"input {str(path)!r} is not a readable parquet file: {e}") from None
        columns, n_rows = list(meta.schema_arrow.names), meta.metadata.num_rows
        non_numeric = [n for n, t in zip(columns, meta.schema_arrow.types)
                       if n != id_column and not (pa.types.is_integer(t) or pa.types.is_floating(t))]
        kind = "parquet"
    else:
        try:  # the first rows tell most type errors early; later chunks are checked as they come
            head = pd.read_csv(path, nrows=_CSV_PROBE_ROWS)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise ValueError(f"input {str(path)!r} is not a readable CSV file with a header row: {e}") from None
        columns, n_rows, kind = list(head.columns), (0 if head.empty else None), "csv"
        non_numeric = [n for n, t in head.dtypes.items() if n != id_column and not pd.api.types.is_numeric_dtype(t)]
    if non_numeric:
        raise ValueError(f"input {str(path)!r}: column {non_numeric[0]!r} is not numeric; every column but the "
                         f"id column {id_column!r} must be a feature")
    has_id = id_column in columns
    features = tuple(c for c in columns if c != id_column)
    return ScoringInput(path, kind, features, id_column if has_id else ROW_COLUMN, has_id, len(features), n_rows)


def iter_chunks(inp: ScoringInput, chunk_rows: int) -> Iterator[tuple[int, pa.Array, np.ndarray]]:
    """Yield ``(start, keys, x)`` over the input, at most ``chunk_rows`` rows at a time.

    ``start`` is the position of the chunk's first row; ``keys`` the id values or row positions;
    ``x`` of shape (n, n_features) float64, NaN where the input has a null.
    """
    start = 0
    for keys, x in _raw_chunks(inp, chunk_rows):
        if keys is None:
            keys = pa.array(np.arange(start, start + len(x), dtype=np.int64))
        yield start, keys, x
        start += len(x)


def _raw_chunks(inp: ScoringInput, chunk_rows: int):
    if inp.kind == "npy":
        x = np.load(inp.path, mmap_mode="r")  # pages are read as chunks touch them
        for s in range(0, len(x), chunk_rows):
            yield None, np.asarray(x[s:s + chunk_rows], dtype=np.float64)
    elif inp.kind == "parquet":
        columns = [*([inp.key] if inp.has_id else []), *inp.features]
        for batch in pq.ParquetFile(inp.path).iter_batches(batch_size=chunk_rows, columns=columns):
            x = np.empty((batch.num_rows, inp.n_features), dtype=np.float64)  # (n, n_features)
            for j, name in enumerate(inp.features):
                x[:, j] = batch.column(name).to_numpy(zero_copy_only=False)  # nulls become NaN
            yield (batch.column(inp.key) if inp.has_id else None), x
    else:
        start = 0
        for frame in pd.read_csv(inp.path, chunksize=chunk_rows):
            features = frame[list(inp.features)]
            bad = [c for c, t in features.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
            if bad:
                raise ValueError(f"{_where(inp, start, len(frame))}: column {bad[0]!r} is not numeric "
                                 f"(e.g. {features[bad[0]].iloc[0]!r})")
            yield (pa.array(frame[inp.key]) if inp.has_id else None), features.to_numpy(dtype=np.float64)
            start += len(frame)


# ------------------------------------------------------------------------------------ model
def load_model(uri: str) -> ScoringModel:
    """Load a DEC model with ``serving.loading`` (the installed pyfunc class; no code stored with the
    model runs in this process) and read its width, k and request limit.

    Raises
    ------
    ValueError
        If the URI does not load or is not a DEC ONNX model, naming it.
    """
    from serving.loading import load_dec_model

    pyfunc = load_dec_model(uri)
    dec = pyfunc.unwrap_python_model()  # serving.onnx_pyfunc.DECOnnxModel
    return ScoringModel(uri, pyfunc, dec.n_features, dec.n_clusters, dec.max_batch_rows)


# ------------------------------------------------------------------------------------ scoring
@dataclass(frozen=True)
class ScoringJob:
    """A checked scoring job (``plan``): the model loaded, the input described, the output free."""

    model: ScoringModel
    input: ScoringInput
    output: Path
    engine: str
    chunk_rows: int
    spark_master: str | None


def plan(
    model: str,
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    engine: str = "local",
    id_column: str = "id",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    spark_master: str | None = None,
) -> ScoringJob:
    """Check every parameter, describe the input and load the model, before any row is scored.

    Parameters
    ----------
    model : str
        Model URI: ``models:/name@alias``, ``models:/name/version``, ``runs:/<id>/model``, a path.
    input : path
        A ``.parquet`` or ``.csv`` table (numeric feature columns, optionally the id column) or a
        2-D ``.npy`` array, of raw features (the model applies its own scaling).
    output : path
        Must not exist; its folder must. A parquet file (``local``) or a parquet directory
        (``spark``), created only when every row has been scored: a failure leaves nothing behind.
    engine : {'local', 'spark'}
    id_column : str, default='id'
        Name of the input's id column, carried to the output; absent, the key is ``row``.
    chunk_rows : int, default=10_000
        Rows per model call, capped at the model's ``max_batch_rows``: bounds the local engine's
        memory, and is Spark's Arrow batch (``spark.sql.execution.arrow.maxRecordsPerBatch``).
    spark_master : str, optional
        Spark master URL; default ``$SPARK_MASTER``, else ``local[*]``. Ignored when a Spark
        session is already active in this process (that session is used as it is).

    Returns
    -------
    ScoringJob
        Run it with ``execute``.

    Raises
    ------
    ValueError
        For a bad parameter, an unreadable or mis-shaped input, a model that does not load, or
        ``engine='spark'`` without pyspark or Java, naming what is wrong.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an integer >= 1; got {chunk_rows!r}")
    output = Path(output)
    if output.exists():
        raise ValueError(f"output {str(output)!r} already exists; remove it or choose another path")
    if not output.parent.is_dir():
        raise ValueError(f"output {str(output)!r}: folder {str(output.parent)!r} does not exist")
    inp = open_input(input, id_column)
    if inp.n_rows == 0:
        raise ValueError(f"input {str(inp.path)!r} has no rows")
    if engine == "spark":
        _check_spark_available()
    loaded = load_model(model)
    if inp.n_features != loaded.n_features:
        what = f"{inp.n_features} feature columns" + (f" besides the id column {inp.key!r}" if inp.has_id else "")
        raise ValueError(f"input {str(inp.path)!r} has {what}; model {model!r} expects {loaded.n_features}")
    return ScoringJob(loaded, inp, output, engine, min(chunk_rows, loaded.max_batch_rows), spark_master)


def execute(job: ScoringJob) -> ScoreResult:
    """Score every row of the job's input and write the output.

    Raises
    ------
    ValueError
        If the model refuses a row (non-numeric, NaN or infinite values), naming where.
    """
    started = time.perf_counter()
    master = None
    with _partial(job.output) as partial:
        if job.engine == "local":
            _score_local(job.model, job.input, partial, job.chunk_rows)
        else:
            master = _score_spark(job.model, job.input, partial, job.chunk_rows, job.spark_master)
    seconds = time.perf_counter() - started
    sizes = cluster_sizes(job.output, job.model.n_clusters)
    return ScoreResult(job.output, int(sum(sizes)), sizes, seconds, job.engine, master)


def score_file(model: str, input: str | os.PathLike, output: str | os.PathLike, **options) -> ScoreResult:
    """``execute(plan(model, input, output, **options))``: see ``plan`` for the parameters."""
    return execute(plan(model, input, output, **options))


def cluster_sizes(output: str | os.PathLike, n_clusters: int) -> list[int]:
    """Rows per cluster in a scoring output (file or directory), reading only its ``label`` column."""
    counts = np.zeros(n_clusters, dtype=np.int64)
    dataset = pq.ParquetDataset(output)
    for fragment in dataset.fragments:
        for batch in fragment.to_batches(columns=["label"]):
            counts += np.bincount(batch.column(0).to_numpy(), minlength=n_clusters)
    return counts.tolist()


@contextmanager
def _partial(output: Path):
    """A path beside ``output`` to write to; renamed to ``output`` on success, deleted on failure.

    Not hidden (no leading dot): Spark ignores input paths that start with '.' or '_'.
    """
    partial = output.with_name(f"{output.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield partial
        os.rename(partial, output)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial)
        elif partial.exists():
            partial.unlink()


def _score_local(model: ScoringModel, inp: ScoringInput, path: Path, chunk_rows: int) -> None:
    from mlflow.exceptions import MlflowException

    with _ChunkWriter(path, inp) as writer:
        for start, keys, x in iter_chunks(inp, chunk_rows):
            try:
                predictions = model.pyfunc.predict(x)
            except MlflowException as e:
                raise ValueError(f"{_where(inp, start, len(x))}: {e.message.splitlines()[0]}") from None
            writer.write(start, _predictions_table(inp.key, keys, predictions, model.n_clusters))


class _ChunkWriter:
    """Parquet writer whose schema is the first chunk's; a later chunk of another key type is an error."""

    def __init__(self, path: Path, inp: ScoringInput):
        self.path, self.inp, self._writer = path, inp, None

    def write(self, start: int, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema)
        elif table.schema != self._writer.schema:
            key = self.inp.key
            raise ValueError(f"{_where(self.inp, start, table.num_rows)}: column {key!r} changed type from "
                             f"{self._writer.schema.field(key).type} to {table.schema.field(key).type}")
        self._writer.write_table(table)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._writer is not None:
            self._writer.close()
        elif exc[0] is None:
            raise ValueError(f"input {str(self.inp.path)!r} has no rows")


def _where(inp: ScoringInput, start: int, n_rows: int) -> str:
    return f"input {str(inp.path)!r}, rows {start}..{start + n_rows - 1}"


def _predictions_table(key: str, keys: pa.Array, predictions: pd.DataFrame, n_clusters: int) -> pa.Table:
    columns = {key: keys, "label": pa.array(predictions["label"].to_numpy(dtype=np.int64))}
    for j in range(n_clusters):
        columns[f"q_{j}"] = pa.array(predictions[f"q_{j}"].to_numpy(dtype=np.float64))
    return pa.table(columns)


# ------------------------------------------------------------------------------------ spark
def _check_spark_available() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise ValueError("engine='spark' needs pyspark: pip install 'dec-mlflow[spark]'") from None
    java_home = os.environ.get("JAVA_HOME")
    if not (shutil.which("java") or (java_home and Path(java_home, "bin", "java").exists())):
        raise ValueError("engine='spark' needs Java 17 or newer: no java on PATH and JAVA_HOME is not set")


def spark_session(master: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """The active Spark session, or a new one on ``master`` (default ``$SPARK_MASTER``, else ``local[*]``).

    Returns ``(session, created)``; stop the session when ``created``. A new local session binds
    to 127.0.0.1 (unless ``SPARK_LOCAL_IP`` says otherwise), runs its Python workers on this
    interpreter (unless ``PYSPARK_PYTHON`` does) and has no web UI. Either way the session's Arrow batches for Python UDFs are
    set to ``chunk_rows`` rows (``_ARROW_BATCH_CONF``).
    """
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    created = session is None
    if created:
        master = master or os.environ.get("SPARK_MASTER") or DEFAULT_SPARK_MASTER
        builder = SparkSession.builder.master(master).appName("dec-mlflow score")
        local = master.startswith("local")
        if local:
            builder = (builder.config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1")
                       .config("spark.ui.enabled", "false"))
        # Read when the context starts: PYSPARK_PYTHON is the workers' interpreter (default: whatever
        # `python3` is on PATH), SPARK_LOCAL_IP the JVM's address (default: the host's interface).
        # Locally: this interpreter, and loopback only.
        environ = {"PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"} if local else {}
        with temporary_environ({k: v for k, v in environ.items() if not os.environ.get(k)}):
            session = builder.getOrCreate()
        session.sparkContext.setLogLevel("WARN")
    for key, value in _ARROW_BATCH_CONF.items():
        session.conf.set(key, value if value is not None else str(chunk_rows))
    return session, created


# Spark 4 hands a pandas UDF the parquet reader's columnar batches as they are (up to 4096 rows or a
# row group) and ignores maxRecordsPerBatch unless columnar input is off; the model refuses batches
# above its max_batch_rows, and chunk_rows is what bounds each Python worker's memory.
_ARROW_BATCH_CONF = {
    "spark.sql.execution.arrow.pythonUDF.columnarInput.enabled": "false",
    "spark.sql.execution.arrow.maxRecordsPerBatch": None,  # chunk_rows
}


def _score_spark(model: ScoringModel, inp: ScoringInput, path: Path, chunk_rows: int, master: str | None) -> str:
    """Score with ``mlflow.pyfunc.spark_udf``; return the master URL of the session used."""
    import mlflow
    from pyspark.sql import functions as F

    spark, created = spark_session(master, chunk_rows)
    staging = path.with_name(path.name + ".input")  # next to the output: executors must see both
    try:
        if inp.kind == "parquet":
            frame = spark.read.parquet(str(inp.path))
            features = inp.features
            if not inp.has_id:  # the position of the row in the file, as the local engine numbers it
                frame = frame.withColumn(ROW_COLUMN, F.col("_metadata.row_index"))
        else:
            features = _stage_as_parquet(inp, staging, chunk_rows)
            frame = spark.read.parquet(str(staging))
        # The features go to the model as a struct, which spark_udf hands over as a pandas DataFrame
        # of n_features numeric columns per Arrow batch: what the DEC pyfunc takes whether it was
        # logged with a float64 tensor signature or without an input schema. Nulls become NaN, which
        # the model refuses with its own message, as in the local engine.
        x = F.struct(*(F.coalesce(F.col(_quote(c)).cast("double"), F.lit(float("nan"))).alias(f"f{j}")
                       for j, c in enumerate(features)))
        result_type = ", ".join(["label long", *(f"q_{j} double" for j in range(model.n_clusters))])
        predict = mlflow.pyfunc.spark_udf(spark, model.uri, result_type=result_type, env_manager="local")
        scored = frame.select(F.col(_quote(inp.key)), predict(x).alias("p")).select(_quote(inp.key), "p.*")
        try:
            scored.write.parquet(str(path))
        except Exception as e:  # a task failed: surface the model's own message when it gave one
            found = re.search(r"MlflowException: (.+)", str(e))
            if found is None:
                raise
            raise ValueError(f"input {str(inp.path)!r}: {found.group(1).strip()}") from None
        return spark.sparkContext.master
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        if created:
            spark.stop()


def _stage_as_parquet(inp: ScoringInput, staging: Path, chunk_rows: int) -> tuple[str, ...]:
    """Copy a CSV or .npy input, chunk by chunk, into a parquet Spark can read; return its feature columns."""
    features = tuple(f"f{j}" for j in range(inp.n_features))
    staging.mkdir()
    with _ChunkWriter(staging / "part-0.parquet", inp) as writer:
        for start, keys, x in iter_chunks(inp, chunk_rows):
            writer.write(start, pa.table({inp.key: keys, **{name: x[:, j] for j, name in enumerate(features)}}))
    return features


def _quote(column: str) -> str:
    """A column name as Spark SQL reads it literally (dots, spaces and backticks included)."""
    return "`" + column.replace("`", "``") + "`"
