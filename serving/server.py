"""Serve a DEC model under load: uvicorn workers, a request body limit enforced before parsing.

    python -m serving.server -m models:/dec-mnist@champion -h 127.0.0.1 -p 5000

The same endpoints, request formats and answers as ``mlflow models serve`` (``/ping``, ``/health``,
``/version``, ``/invocations`` with ``inputs``, ``instances``, ``dataframe_split``,
``dataframe_records``, CSV or Parquet bodies), with what ``bench/bench_serving.py`` showed that
``mlflow models serve`` lacks under load and abuse:

- a body larger than ``--max-body-mb`` is answered 413 from its ``Content-Length`` (or, when
  streamed, as soon as the limit is passed) without being read or parsed, and the connection is
  closed; ``mlflow models serve`` reads and parses any body;
- ``inputs`` bodies (a list of rows) take a direct path: one ``json.loads``, one numpy array,
  ``DECOnnxModel.predict_arrays`` and the answer written from the arrays, which skips the pandas
  DataFrame that MLflow builds around each request and answer (most of a 1-row request's time);
  every other format goes through MLflow's own ``scoring_server.invocations``;
- several worker processes (``--workers``), each with ``--intra-op-threads`` onnxruntime threads so
  that together they do not oversubscribe the cores, scoring in one thread per worker (at most one
  batch in memory per worker) while the event loop keeps answering ``/ping``; no access log;
- a request that times out is answered 504 and its onnxruntime run stopped; until its scoring thread
  is free again, new requests to that worker are answered 503 at once instead of queueing behind it;
- TCP_NODELAY on every connection, from the listening socket this module opens and hands to uvicorn
  (its public ``fd`` option), whatever uvicorn's version, HTTP parser and event loop;
- the model is loaded by ``serving.loading.load_dec_model``: no code from the artifact runs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor

import click
import numpy as np
import onnxruntime as ort
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel, scoring_server
from mlflow.version import VERSION

from serving.loading import load_dec_model, local_model_dir
from serving.onnx_pyfunc import check_batch

DEFAULT_MAX_BODY_MB = 16.0  # ~8,000 MNIST rows of integer pixels, ~1,000 rows of full-precision floats
DEFAULT_LIMIT_CONCURRENCY = 32  # connections per worker; beyond them 503 (bounds memory at ~32 bodies)
BACKLOG = 2048  # pending connections on the listening socket (uvicorn's default)
_ENV = {"model": "DEC_SERVING_MODEL_DIR", "max_body": "DEC_SERVING_MAX_BODY_BYTES", "threads": "DEC_SERVING_INTRA_OP_THREADS"}
_JSON = "application/json"
_logger = logging.getLogger(__name__)


class ScoringApp:
    """ASGI application scoring one loaded DEC model.

    Parameters
    ----------
    model : mlflow.pyfunc.PyFuncModel
        From ``serving.loading.load_dec_model``.
    max_body_bytes : int
        Largest request body read; larger ones get 413 before any byte of them is parsed.
    timeout : float
        Seconds before a request is answered 504 (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``).

    A request that times out is a runaway: Python cannot stop its thread. Its onnxruntime run (for
    ``inputs`` requests) is told to terminate, which stops it at the next graph node; parsing and
    MLflow's own scoring path cannot be interrupted. While the runaway's thread is still busy, new
    requests are answered 503 with ``Retry-After`` without being read, instead of queueing behind it.
    """

    def __init__(self, model: PyFuncModel, max_body_bytes: int, timeout: float):
        self.model = model
        self.python_model = model.unwrap_python_model()
        self.input_schema = model.metadata.get_input_schema()
        self.max_body_bytes = int(max_body_bytes)
        self.timeout = timeout
        # one scoring thread: batches are scored one at a time per worker, the event loop stays free
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="dec-score")
        self._runaway: Future | None = None  # the scoring of a timed-out request, while its thread is still busy

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path in ("/ping", "/health") and method == "GET":
            return await _respond(send, 200, b"\n", _JSON)
        if path == "/version" and method == "GET":
            return await _respond(send, 200, VERSION.encode(), _JSON)
        if path != "/invocations" or method != "POST":
            return await _respond(send, 404, _error("ENDPOINT_NOT_FOUND", f"no endpoint {method} {path}"), _JSON)
        if self._runaway is not None and not self._runaway.done():
            return await self._refuse_busy(send)
        headers = dict(scope["headers"])
        body = await self._read_body(headers, receive, send)
        if body is None:
            return  # refused (413) or the client went away
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        run_options = ort.RunOptions()  # its terminate flag stops the request's onnxruntime run from this thread
        scoring = self.executor.submit(self.score, body, content_type, run_options)
        try:
            status, payload, media = await asyncio.wait_for(asyncio.wrap_future(scoring), self.timeout)
        except asyncio.TimeoutError:  # wait_for cancelled the future: a request still queued never runs
            run_options.terminate = True
            if not scoring.cancelled():
                self._watch_runaway(scoring)
            status, payload, media = 504, _error("DEADLINE_EXCEEDED", "Request processing time exceeded limit"), _JSON
        await _respond(send, status, payload, media)

    def _watch_runaway(self, scoring: Future) -> None:
        """Refuse new work while ``scoring`` (timed out) still holds the scoring thread; log when it lets go."""
        self._runaway, started = scoring, time.monotonic()
        scoring.add_done_callback(lambda _: _logger.warning(
            "a request that timed out after %g s released its worker %.1f s later", self.timeout, time.monotonic() - started))

    async def _refuse_busy(self, send) -> None:
        message = (f"this worker is still stopping a request that exceeded the {self.timeout:g} s timeout "
                   "(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT); retry shortly")
        # the body is not read, so the connection is closed after the answer
        await _respond(send, 503, _error("TEMPORARILY_UNAVAILABLE", message), _JSON, close=True,
                       extra_headers=[(b"retry-after", b"1")])

    async def _read_body(self, headers: dict, receive, send) -> bytes | None:
        """The request body, or None after answering 413 when it is (or declares to be) over the limit."""
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse_large(send, int(declared))
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # a chunked body, or more bytes than declared
                await self._refuse_large(send, size, streamed=True)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse_large(self, send, size: int, streamed: bool = False) -> None:
        what = f"request body passed {size} bytes" if streamed else f"request body of {size} bytes"
        message = (f"{what}; at most {self.max_body_bytes} bytes are accepted (--max-body-mb "
                   f"{self.max_body_bytes / 2**20:.3g}); split the batch into smaller requests")
        # close the connection: the rest of the body is never read
        await _respond(send, 413, _error("REQUEST_LIMIT_EXCEEDED", message), _JSON, close=True)

    def score(self, body: bytes, content_type: str, run_options: ort.RunOptions | None = None) -> tuple[int, bytes, str]:
        """(status, payload, media type) for one request body, as MLflow's scoring server answers it.

        ``run_options`` goes to the onnxruntime run of an ``inputs`` request; once its ``terminate``
        is set (the request timed out), the run stops and the answer is the 504 already sent.
        """
        try:
            parts = [p.strip() for p in content_type.split(";")]
            options = dict(p.partition("=")[::2] for p in parts[1:])
            if parts[0] == _JSON and set(options) <= {"charset"} and options.get("charset", "utf-8").lower() == "utf-8":
                try:
                    request = json.loads(body)
                except ValueError as e:  # MLflow would echo the whole body back; keep it short
                    raise MlflowException.invalid_parameter_value(f"request body is not valid JSON: {e}") from None
                if isinstance(request, dict) and "inputs" in request and set(request) <= {"inputs", "params"}:
                    return 200, self._score_inputs(request, run_options), _JSON
                body = request  # MLflow's parser takes the decoded dict as well
            result = scoring_server.invocations(body, content_type, self.model, self.input_schema)
            return result.status, result.response.encode(), result.mimetype
        except MlflowException as e:
            return e.get_http_status_code(), e.serialize_as_json().encode(), _JSON
        except Exception:  # a bug, not a bad request: log it, answer 500, keep serving
            if run_options is not None and run_options.terminate:  # stopped because it timed out
                return 504, _error("DEADLINE_EXCEEDED", "Request processing time exceeded limit"), _JSON
            _logger.exception("scoring failed")
            return 500, _error("INTERNAL_ERROR", "internal error while scoring; see the server log"), _JSON

    def _score_inputs(self, request: dict, run_options: ort.RunOptions | None = None) -> bytes:
        params = request.get("params") or {}
        include_embedding = params.get("include_embedding", False) if isinstance(params, dict) else None
        if not isinstance(include_embedding, bool):
            raise MlflowException.invalid_parameter_value(
                f"params must be an object whose include_embedding is true or false; got {params!r:.100}")
        try:
            x = np.asarray(request["inputs"])  # what MLflow's parser makes of `inputs` without an input schema
        except ValueError as e:  # ragged rows
            raise MlflowException.invalid_parameter_value(f"inputs must be a list of equally long rows of numbers: {e}") from None
        model = self.python_model
        x = check_batch(x, n_features=model.n_features, max_batch_rows=model.max_batch_rows)
        return encode_predictions(*model.predict_arrays(x, include_embedding, run_options))

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.executor.shutdown(wait=False, cancel_futures=True)
                await send({"type": "lifespan.shutdown.complete"})
                return


def encode_predictions(q: np.ndarray, labels: np.ndarray, z: np.ndarray | None = None) -> bytes:
    """``{"predictions": [{"label": .., "q_0": .., ...}, ...]}``, as MLflow writes ``predict``'s DataFrame."""
    names = ["label", *(f"q_{j}" for j in range(q.shape[1]))]
    columns = [labels.tolist(), *q.T.tolist()]
    if z is not None:
        names += [f"z_{j}" for j in range(z.shape[1])]
        columns += z.T.tolist()
    records = [dict(zip(names, row)) for row in zip(*columns)]
    return json.dumps({"predictions": records}).encode()


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": message}).encode()


async def _respond(send, status: int, payload: bytes, media: str, close: bool = False,
                   extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", media.encode()), (b"content-length", str(len(payload)).encode()), *extra_headers]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host``:``port`` with TCP_NODELAY, for uvicorn's ``fd`` option.

    Linux copies the options of a listening socket to each connection it accepts (checked by
    ``tests/test_serving.py``), so every connection has Nagle's algorithm off whoever accepts it: the
    worker processes (uvicorn hands them this socket) and any event loop. Without it, a response whose headers and body are written
    separately waits for the client's delayed ACK: 44 ms per request (bench/bench_serving.py, two
    workers, h11, asyncio, whose listening sockets uvicorn then made without IPPROTO_TCP, so asyncio
    skipped TCP_NODELAY). uvicorn's ``fd`` option is public, where its protocol classes are not.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.set_inheritable(True)
    return sock


def create_app() -> ScoringApp:
    """The app of one worker process, configured by the environment ``main`` sets (uvicorn's factory)."""
    threads = os.environ.get(_ENV["threads"])
    model = load_dec_model(os.environ[_ENV["model"]], None if threads is None else {"intra_op_threads": int(threads)})
    return ScoringApp(model, int(os.environ[_ENV["max_body"]]), MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())


@click.command(context_settings={"help_option_names": ["--help"]})
@click.option("-m", "--model-uri", required=True, help="models:/name@alias, models:/name/version, runs:/<id>/model or a model directory.")
@click.option("-h", "--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("-p", "--port", type=click.IntRange(0, 65535), default=5000, show_default=True)
@click.option("-w", "--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes, each holding the model; one per core suits a CPU-only host.")
@click.option("--intra-op-threads", type=click.IntRange(min=0), default=None,
              help="onnxruntime threads per worker; default cores // workers (at least 1). 0 = onnxruntime's choice.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=DEFAULT_MAX_BODY_MB, show_default=True,
              help="Largest request body in MiB; larger ones are answered 413 before being read.")
@click.option("--limit-concurrency", type=click.IntRange(min=1), default=DEFAULT_LIMIT_CONCURRENCY, show_default=True,
              help="Open connections per worker before new ones are answered 503.")
@click.option("--access-log/--no-access-log", default=False, show_default=True, help="Log every request.")
@click.option("--http", type=click.Choice(["auto", "h11", "httptools"]), default="auto", show_default=True,
              help="uvicorn's HTTP parser; 'auto' takes httptools when installed.")
@click.option("--loop", type=click.Choice(["auto", "asyncio", "uvloop"]), default="auto", show_default=True,
              help="uvicorn's event loop; 'auto' takes uvloop when installed.")
def main(model_uri, host, port, workers, intra_op_threads, max_body_mb, limit_concurrency, access_log, http, loop):
    """Serve the DEC model MODEL_URI over HTTP with the same API as `mlflow models serve`."""
    import uvicorn

    try:
        local = str(local_model_dir(model_uri))  # resolve aliases once, for every worker
        if intra_op_threads is None:
            intra_op_threads = max(1, (os.cpu_count() or 1) // workers)
        max_body_bytes = int(max_body_mb * 2**20)
        os.environ.update({_ENV["model"]: local, _ENV["max_body"]: str(max_body_bytes), _ENV["threads"]: str(intra_op_threads)})
        app = create_app()  # loads and checks the model here, so a bad model fails now with one line
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    if http == "httptools" and importlib.util.find_spec("httptools") is None:
        raise click.BadParameter("httptools is not installed: pip install httptools", param_hint="--http")
    try:
        sock = listening_socket(host, port)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    click.echo(f"Serving {model_uri} on http://{host}:{sock.getsockname()[1]} with {workers} worker(s), {intra_op_threads} "
               f"onnxruntime thread(s) each, on {app.python_model.provider}; bodies up to {max_body_bytes} bytes", err=True)
    options = dict(fd=sock.fileno(), limit_concurrency=limit_concurrency, access_log=access_log, log_level="warning",
                   http=http, loop=loop, backlog=BACKLOG)
    with sock:
        if workers == 1:
            uvicorn.run(app, **options)
        else:
            del app  # each worker process loads its own copy
            uvicorn.run("serving.server:create_app", factory=True, workers=workers, **options)


if __name__ == "__main__":
    main()
