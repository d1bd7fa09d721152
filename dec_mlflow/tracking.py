"""Everything MLflow: stage runs and experiments, metrics callback, run reuse, datasets,
autoencoder artifacts, model registry.

The estimator and training loops never import mlflow; the lifecycle stages wire them to this module.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_RUN_ID
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from scipy import sparse

from dec_mlflow.callbacks import Callback, SelfTrainRecorder
from dec_mlflow.checkpoint import PretrainCheckpoint, PretrainedAutoencoder, load_tensors, save_tensors
from dec_mlflow.data import Dataset
from dec_mlflow.environment import temporary_environ
from dec_mlflow.metrics import clustering_scores
from dec_mlflow.model import DECNet
from dec_mlflow.rows import Features, chunks, dense

AUTOENCODER_ARTIFACT = "autoencoder/autoencoder.pt"
NETWORK_ARTIFACT = "network/dec_network.pt"  # the trained DECNet, for re-export without retraining
STAGE_TAG = "dec.stage"  # which step of the lifecycle a run is: pretrain, cluster, evaluate, export
KEY_TAG = "dec.pretrain_key"  # fingerprint of data content + pretraining settings, for reuse and resume
CLUSTER_KEY_TAG = "dec.cluster_key"  # fingerprint of a cluster run's parameters and data, to end its killed twins
MAX_CLUSTER_METRICS = 50  # above this many clusters, per-cluster size metrics would swamp the UI
LAUNCHER_TAG = "dec.launcher_run"  # on a run started elsewhere than the `mlflow run` run: that run's id
LAUNCHED_TAG = "dec.launched_run"  # on such an `mlflow run` run: the id of the run that holds the results
CHECKPOINT_ARTIFACT = "checkpoint/pretrain_state.pt"  # an unfinished pretraining, to resume it after a kill
# Pretraining writes its checkpoint every this many epochs (of each stage); DEC_CHECKPOINT_EVERY overrides, 0 = never.
CHECKPOINT_EVERY = 5
# ... and no sooner than this many seconds after the previous one: small data has thousands of one-step epochs,
# and writing the weights and momentum every 5 of them would cost more than the training
CHECKPOINT_MIN_INTERVAL_S = 60
OWNER_TAG = "dec.owner"  # host, pid and start time of the process running the run, to tell whether it still lives
HEARTBEAT_TAG = "dec.heartbeat"  # unix time of the owner's last sign of life (a timer thread writes it every minute)
HEARTBEAT_EVERY_S = 60
# A RUNNING run of another machine counts as dead once its heartbeat is this old; one of this machine as soon as
# its process is gone. Pretraining epochs far longer than this would need DEC_STALE_AFTER_S raised.
STALE_AFTER_S = 1800
RESUMED_BY_TAG = "dec.resumed_by"  # on a run that was resumed (or ended as dead): the run that took over
RESUMED_FROM_TAG = "dec.resumed_from_run"  # on the run that resumed it
CLAIM_TAG = "dec.takeover_claim"  # on a stopped run: '<run id>:<token>' of the run claiming to take it over
# A claimant waits this long between writing its claim and reading it back (claim_runs). It must exceed the time
# from a claimant's read of the run to its write landing, which each claimant checks of itself; an MLflow call
# takes milliseconds on sqlite and tens of them through a tracking server.
CLAIM_SETTLE_S = 2.0
FIGURE_WARNING_TAG = "dec.figure_warning"  # + .<artifact name>: why a figure was drawn simplified or not at all
# tags of an `mlflow run` run that say where the code came from; copied when the work moves to another run
_SOURCE_TAG_PREFIXES = ("mlflow.source.", "mlflow.project.", "mlflow.gitRepoURL", "mlflow.user")


@contextmanager
def stage_run(run_name: str, experiment: str = "") -> Iterator[mlflow.ActiveRun]:
    """The run of one lifecycle stage: the run ``mlflow run`` started for it, else a new one.

    ``experiment`` names the experiment (created if missing); '' leaves the choice to MLflow: the
    experiment of the run ``mlflow run`` started (its ``--experiment-name``), else
    ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``, else Default. ``mlflow run`` creates its
    run before the command sees ``-P experiment``; when that run is in another experiment, the
    stage starts a new run in ``experiment`` (tagged ``dec.launcher_run``, with the project's source
    tags) and the ``mlflow run`` run is left as a launcher tagged ``dec.launched_run``.
    The run ends KILLED if the block is interrupted (Ctrl-C, or a SIGTERM the entry point turned into
    ``environment.Stopped``), FAILED if it raises anything else, FINISHED otherwise.
    """
    experiment_id, tags = None, {}
    if experiment:
        experiment_id = _experiment_id(experiment)
        launcher_id = MLFLOW_RUN_ID.get()
        launcher = MlflowClient().get_run(launcher_id) if launcher_id else None
        if launcher is not None and launcher.info.experiment_id != experiment_id:
            del os.environ[MLFLOW_RUN_ID.name]  # start a new run instead of resuming that one
            tags = {k: v for k, v in launcher.data.tags.items() if k.startswith(_SOURCE_TAG_PREFIXES)}
            tags[LAUNCHER_TAG] = launcher_id
    with mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=tags or None) as run:
        mlflow.set_tag("mlflow.runName", run_name)  # start_run ignores run_name when resuming an `mlflow run` run
        if LAUNCHER_TAG in tags:
            MlflowClient().set_tag(tags[LAUNCHER_TAG], LAUNCHED_TAG, run.info.run_id)
            MlflowClient().set_tag(tags[LAUNCHER_TAG], "mlflow.note.content",
                                   f"This run only launched run {run.info.run_id} ({run_name}) in experiment "
                                   f"{experiment!r} (-P experiment); its results are there. "
                                   f"`mlflow run --experiment-name {experiment}` would have started it there directly.")
        with _killed_on_interrupt():
            yield run


@contextmanager
def child_run(run_name: str) -> Iterator[mlflow.ActiveRun]:
    """A run nested in the active run, in the same experiment (start_run alone would use the default one).

    It ends as ``stage_run``'s does: KILLED when interrupted, FAILED on an error, else FINISHED.
    """
    experiment_id = mlflow.active_run().info.experiment_id
    with mlflow.start_run(run_name=run_name, nested=True, experiment_id=experiment_id) as run:
        mlflow.set_tag("mlflow.runName", run_name)
        with _killed_on_interrupt():
            yield run


def end_open_children(run_id: str, status: str) -> list[str]:
    """End ``status`` every run nested (at any depth) in ``run_id`` that is still RUNNING; their ids.

    For a launcher whose processes have all stopped: a child run they opened stays RUNNING when its
    process was killed, or stopped while it was still ending its runs after an error.
    """
    client, ended, parents = MlflowClient(), [], [run_id]
    experiment_id = client.get_run(run_id).info.experiment_id
    while parents:
        parent = parents.pop()
        for child in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"):
            parents.append(child.info.run_id)
            if child.info.status == "RUNNING":
                client.set_terminated(child.info.run_id, status=status)
                ended.append(child.info.run_id)
    return ended


@contextmanager
def _killed_on_interrupt() -> Iterator[None]:
    """End the active run KILLED when the block is interrupted, where MLflow would end it FAILED.

    A KeyboardInterrupt is Ctrl-C, or SIGTERM turned into ``environment.Stopped`` by the entry point;
    the run was stopped from outside, not failed, and the resume logic finds it as stopped either way.
    Nested runs end first, each in its own block.
    """
    try:
        yield
    except KeyboardInterrupt as stop:
        run_id = mlflow.active_run().info.run_id
        try:
            mlflow.end_run("KILLED")
        except MlflowException:
            # The stop may have struck inside one of MLflow's own writes: the frames of its traceback still
            # hold that write's SQLite connection, and with it the database's write lock (CI saw end_run wait
            # out SQLite's 20 s busy timeout). Clearing their locals lets the collector close the connection;
            # end_run has already taken the run off MLflow's stack, so the client ends it.
            traceback.clear_frames(stop.__traceback__)
            gc.collect()
            MlflowClient().set_terminated(run_id, "KILLED")
        raise


@contextmanager
def run_environment(run: mlflow.ActiveRun) -> Iterator[None]:
    """Environment in which a child process's ``stage_run`` resumes ``run`` in the same stores.

    Sets ``MLFLOW_RUN_ID``, ``MLFLOW_EXPERIMENT_ID`` and the tracking and registry URIs (which may
    have been set in this process only, by ``mlflow.set_tracking_uri``), and restores them after.
    """
    values = {"MLFLOW_RUN_ID": run.info.run_id, "MLFLOW_EXPERIMENT_ID": run.info.experiment_id,
              "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_REGISTRY_URI": mlflow.get_registry_uri()}
    with temporary_environ(values):
        yield


def _experiment_id(name: str) -> str:
    """Id of the experiment called ``name``, created if it does not exist."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name)
    if found.lifecycle_stage != "active":
        raise ValueError(f"experiment {name!r} is deleted; restore it (mlflow experiments restore) or choose another name")
    return found.experiment_id


# ------------------------------------------------------------------------------------ resume after a kill
def _process_start(pid: int) -> str:
    """Start time of process ``pid`` in clock ticks since boot (Linux), '' where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner() -> str:
    """'host:pid:start' of this process: who runs the active run."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


@contextmanager
def heartbeat(every_s: float | None = None) -> Iterator[None]:
    """Own the active run for the block: tag it with this process (``dec.owner``) and keep its
    ``dec.heartbeat`` fresh every ``every_s`` seconds (``HEARTBEAT_EVERY_S``, ``DEC_HEARTBEAT_EVERY_S``).

    The heartbeat comes from a timer thread, not from training steps, so it stays fresh through every
    long stage: an epoch, UMAP + GMM, the ONNX export, a slow upload. It stops with the block. A beat
    that fails (the tracking server is unreachable for a moment) is reported on stderr and the next one
    tried. What it cannot cover: a call that holds Python's GIL for longer than ``STALE_AFTER_S``.
    """
    every_s = float(os.environ.get("DEC_HEARTBEAT_EVERY_S", HEARTBEAT_EVERY_S)) if every_s is None else every_s
    run_id, client = mlflow.active_run().info.run_id, MlflowClient()
    client.set_tag(run_id, OWNER_TAG, owner())
    client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
    stop = threading.Event()
    beats = threading.Thread(target=_beat, args=(client, run_id, every_s, stop), name=f"dec-heartbeat-{run_id[:8]}",
                             daemon=True)  # never keeps a finished process alive
    beats.start()
    try:
        yield
    finally:
        stop.set()
        beats.join()


def _beat(client: MlflowClient, run_id: str, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
        except Exception as e:  # a thread's exception would vanish: say it, and beat again next time
            print(f"Warning: run {run_id}: heartbeat not written ({type(e).__name__}: {str(e)[:200]}); retrying "
                  f"in {every_s:g} s", file=sys.stderr, flush=True)


def run_is_dead(run: Run) -> bool:
    """True when ``run`` is RUNNING but nothing runs it any more.

    On this machine: its owner process is gone (or its pid now belongs to another process). On
    another machine: its heartbeat is older than ``STALE_AFTER_S`` (``DEC_STALE_AFTER_S``). A run
    without owner tag (started by other code) is never taken for dead.
    """
    if run.info.status != "RUNNING" or OWNER_TAG not in run.data.tags:
        return False
    host, pid, start = run.data.tags[OWNER_TAG].rsplit(":", 2)
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return bool(start) and _process_start(int(pid)) != start
    heartbeat = float(run.data.tags.get(HEARTBEAT_TAG, "0"))
    return time.time() - heartbeat > float(os.environ.get("DEC_STALE_AFTER_S", STALE_AFTER_S))


def take_over(runs: list[Run], by_run_id: str) -> list[str]:
    """Take over each stopped run of ``runs`` for the active run ``by_run_id``; the ids of those taken over.

    A run taken over is tagged ``dec.resumed_by`` = ``by_run_id`` and, if it was RUNNING with a dead
    process, ended KILLED; so is each of its parents that is RUNNING and dead. When several processes
    take over the same run at the same time, exactly one gets it (:func:`claim_runs`); for the others
    it is left out of the result.
    """
    client, chain = MlflowClient(), []
    for run in runs:
        chain.append(run)
        parent_id = run.data.tags.get("mlflow.parentRunId")
        while parent_id and run_is_dead(parent := client.get_run(parent_id)):
            chain.append(parent)
            parent_id = parent.data.tags.get("mlflow.parentRunId")
    taken = claim_runs(chain, by_run_id)
    for run in taken:
        client.set_tag(run.info.run_id, RESUMED_BY_TAG, by_run_id)
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in taken]


def claim_runs(runs: list[Run], by_run_id: str, *, settle_s: float | None = None) -> list[Run]:
    """The stopped runs of ``runs`` that the active run ``by_run_id`` wins the right to take over, as they are now.

    MLflow has no conditional write (no compare-and-set of a tag), so this is Fischer's mutual exclusion
    on the tag ``dec.takeover_claim``: a claimant reads the run afresh; if it is stopped
    (:func:`is_stopped`), not taken over and not claimed by a live run, the claimant writes
    '<by_run_id>:<random token>', waits ``settle_s`` (``CLAIM_SETTLE_S``, ``DEC_CLAIM_SETTLE_S``) and
    reads the tag back: only the claimant whose token still stands goes on. Of claimants that overlap,
    the last to write wins; one that comes later finds a live claim and gives up, and so does one whose write
    the store refuses because another claimant's first claim was inserted at the same instant. It holds when
    (a) each claimant's read-then-write takes less than ``settle_s``: a claimant measures its own and
    gives up when it took longer, and (b) the store shows every client the latest write: sqlite, the
    SQL stores (PostgreSQL, MySQL) and an MLflow tracking server in front of one, as this project
    uses them. It does not hold for a file store on a network share, nor for a database read from
    lagging replicas. A claim whose claimant run ended or died without taking over does not count.
    """
    settle_s = float(os.environ.get("DEC_CLAIM_SETTLE_S", CLAIM_SETTLE_S)) if settle_s is None else settle_s
    client, tokens = MlflowClient(), {}
    for run in runs:
        run_id, started = run.info.run_id, time.monotonic()
        current = client.get_run(run_id)
        if not is_stopped(current) or RESUMED_BY_TAG in current.data.tags or _live_claim(current, by_run_id):
            continue
        token = _claim_token(by_run_id)
        try:
            client.set_tag(run_id, CLAIM_TAG, token)
        except MlflowException:
            # two claimants that write the first claim at the same instant: the SQL store inserts one and refuses
            # the other's insert (a unique key); the claim that stands is live, and this claimant gives up the run
            if _live_claim(client.get_run(run_id), by_run_id):
                continue
            raise
        if time.monotonic() - started < settle_s:  # else another claimant may already have read back its own claim
            tokens[run_id] = token
    if not tokens:
        return []
    time.sleep(settle_s)
    after = [client.get_run(run_id) for run_id in tokens]
    return [run for run in after if run.data.tags.get(CLAIM_TAG) == tokens[run.info.run_id]]


def _claim_token(by_run_id: str) -> str:
    return f"{by_run_id}:{uuid.uuid4().hex}"


def _live_claim(run: Run, by_run_id: str) -> bool:
    """True when another run claimed ``run`` (:func:`claim_runs`) and is still RUNNING and alive."""
    claimant = run.data.tags.get(CLAIM_TAG, "").split(":")[0]
    if not claimant or claimant == by_run_id:
        return False
    try:
        claimant_run = MlflowClient().get_run(claimant)
    except MlflowException:  # deleted
        return False
    return claimant_run.info.status == "RUNNING" and not run_is_dead(claimant_run)


def is_stopped(run: Run) -> bool:
    """FAILED or KILLED, or RUNNING while nothing runs it (:func:`run_is_dead`)."""
    return run.info.status in ("FAILED", "KILLED") or run_is_dead(run)


def find_dead_runs(stage: str, key: str, key_tag: str = KEY_TAG) -> list[Run]:
    """RUNNING runs of ``stage`` whose ``key_tag`` is ``key``, in the current experiment, whose process is dead."""
    query = f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{key_tag}` = '{key}' and attributes.status = 'RUNNING'"
    return [r for r in MlflowClient().search_runs([_current_experiment_id()], query) if run_is_dead(r)]


def find_resumable_run(stage: str, key: str, by_run_id: str = "") -> Run | None:
    """Newest run of ``stage`` with fingerprint ``key`` that stopped before finishing and left a checkpoint.

    Stopped: :func:`is_stopped`. A run already taken over (tagged ``dec.resumed_by``), or claimed by
    another live run than ``by_run_id`` (:func:`claim_runs`), is not offered.
    """
    query = f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{KEY_TAG}` = '{key}'"
    client = MlflowClient()
    for run in client.search_runs([_current_experiment_id()], query, order_by=["attributes.start_time DESC"]):
        if not is_stopped(run) or RESUMED_BY_TAG in run.data.tags or _live_claim(run, by_run_id):
            continue
        artifacts = client.list_artifacts(run.info.run_id, str(Path(CHECKPOINT_ARTIFACT).parent))
        if any(a.path == CHECKPOINT_ARTIFACT for a in artifacts):
            return run
    return None


def load_checkpoint(run_id: str) -> PretrainCheckpoint:
    """The pretraining checkpoint of run ``run_id``; ValueError if it cannot be read (e.g. cut short by the kill)."""
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT)
    except MlflowException as e:
        raise ValueError(f"run {run_id}: no {CHECKPOINT_ARTIFACT}: {e.message.splitlines()[0]}") from e
    return PretrainCheckpoint.load(local)


def copy_pretraining_history(run_id: str, checkpoint: PretrainCheckpoint) -> None:
    """Copy run ``run_id``'s pretraining curves up to ``checkpoint`` into the active run, so its curves are whole."""
    client, active = MlflowClient(), mlflow.active_run().info.run_id
    current = pretraining_metric(checkpoint.state.stage)
    for key in client.get_run(run_id).data.metrics:
        if not key.startswith(("pretrain", "finetune")):
            continue
        history = [m for m in client.get_metric_history(run_id, key) if key != current or m.step <= checkpoint.state.epoch]
        for start in range(0, len(history), 1000):
            client.log_batch(active, metrics=history[start:start + 1000])


def pretraining_metric(stage: str) -> str:
    """Name of the per-epoch loss metric of a pretraining stage: pretrain_loss, pretrain_layer<i>_loss, finetune_loss."""
    return {"pretrain": "pretrain_loss", "pretrain/finetune": "finetune_loss"}.get(stage, stage.replace("/", "_") + "_loss")


class CheckpointCallback(Callback):
    """Writes pretraining's checkpoint to the active run every ``every`` epochs.

    A checkpoint follows the previous one by at least ``min_interval_s`` seconds (the first is
    written at epoch ``every``), so thousands of short epochs do not write thousands of files.

    The artifact ``checkpoint/pretrain_state.pt`` (tensors + JSON, like the autoencoder's) is
    replaced each time; the tag ``dec.checkpoint`` says which stage and epoch it holds.
    """

    def __init__(self, every: int | None = None, min_interval_s: float | None = None):
        self.every = int(os.environ.get("DEC_CHECKPOINT_EVERY", CHECKPOINT_EVERY)) if every is None else every
        self.min_interval_s = CHECKPOINT_MIN_INTERVAL_S if min_interval_s is None else min_interval_s
        self._saved: float | None = None  # monotonic time of the last checkpoint written

    def on_checkpoint(self, stage, epoch, state):
        if self.every <= 0 or epoch % self.every:
            return
        if self._saved is not None and time.monotonic() - self._saved < self.min_interval_s:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
            state().save(path)
            mlflow.log_artifact(str(path), artifact_path=str(Path(CHECKPOINT_ARTIFACT).parent))
        mlflow.set_tag("dec.checkpoint", f"{stage} epoch {epoch}")
        self._saved = time.monotonic()


class MlflowCallback(Callback):
    """Logs training progress to the active MLflow run, with steps so the UI draws curves.

    Pretraining: ``pretrain_loss`` (end to end), ``pretrain_layer<i>_loss`` and ``finetune_loss``
    per epoch. Self-training, at every target update: ``kl_loss``, ``delta_label``, cluster size
    fractions and, when ``y_true`` is given, ``acc``, ``nmi`` and ``ari``. Under ``distill_rounds``
    > 1 the steps of each round's self-training continue after the previous round's last, so
    the curves run on instead of drawing every round over the first.

    Every stage's wall time: ``stage_seconds_<stage>`` (``/`` as ``_``: ``stage_seconds_init_map``), summed
    over its rounds and logged each time the stage ends; a stage holds the time of the stages inside it
    (``init`` that of ``init_map``), and a stage that restarts counts from its last attempt's begin.
    """

    def __init__(self, n_clusters: int | str, y_true: np.ndarray | None = None):
        self.n_clusters = n_clusters
        self.y_true = y_true
        self._offset, self._last = 0, -1  # the first round starts at step 0
        self._began: dict[str, float] = {}  # stage -> time.perf_counter() at its latest begin
        self._seconds: dict[str, float] = {}  # stage -> seconds of its finished runs

    def on_stage_begin(self, stage, total):
        self._began[stage] = time.perf_counter()
        if stage == "self_train":
            self._offset = self._last + 1

    def on_stage_end(self, stage):
        began = self._began.pop(stage, None)
        if began is None:
            return
        self._seconds[stage] = self._seconds.get(stage, 0.0) + time.perf_counter() - began
        mlflow.log_metric(f"stage_seconds_{stage.replace('/', '_')}", round(self._seconds[stage], 3))

    def on_step(self, stage, step, metrics):
        if not stage.startswith("pretrain"):
            return
        mlflow.log_metric(pretraining_metric(stage), metrics["loss"], step=step)

    def on_retry(self, stage, attempt, message):
        mlflow.log_metric(f"{stage.replace('/', '_')}_restarts", attempt)
        mlflow.set_tag(f"dec.{stage.replace('/', '_')}_restart_{attempt}", message[:5000])

    def on_update(self, step, labels, metrics):
        step = self._last = self._offset + step
        k = self.n_clusters if self.n_clusters != "auto" else int(labels.max()) + 1  # 'auto': as the labels say
        mlflow.log_metrics({**metrics, **cluster_size_metrics(labels, k)}, step=step)
        if self.y_true is not None:
            mlflow.log_metrics(clustering_scores(self.y_true, labels), step=step)


def cluster_size_metrics(labels: np.ndarray, n_clusters: int) -> dict[str, float]:
    """Fraction of samples per cluster (``cluster_<j>_frac``), plus the smallest and largest."""
    frac = np.bincount(labels, minlength=n_clusters) / max(len(labels), 1)
    out = {"cluster_frac_min": float(frac.min()), "cluster_frac_max": float(frac.max())}
    if n_clusters <= MAX_CLUSTER_METRICS:
        out.update({f"cluster_{j}_frac": float(f) for j, f in enumerate(frac)})
    return out


def data_digest(x: Features) -> str:
    """Short content hash of a feature matrix, so runs on the same data match whatever its path.

    Read in chunks: a memory-mapped or sparse float32 matrix hashes as the dense array it stands for.
    """
    h = hashlib.sha1(str((x.shape, x.dtype.str)).encode())
    for block in chunks(x):
        h.update(np.ascontiguousarray(block).data)
    return h.hexdigest()[:16]


def fingerprint(values: dict[str, object]) -> str:
    """Order-independent hash of a dict of settings, for matching runs that did the same work."""
    canonical = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}, sort_keys=True)
    return hashlib.sha1(canonical.encode()).hexdigest()[:16]


def find_finished_run(stage: str, key: str) -> Run | None:
    """Newest FINISHED run of ``stage`` in the current experiment tagged with fingerprint ``key``."""
    query = f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'"
    runs = MlflowClient().search_runs(
        [_current_experiment_id()], query, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def log_dataset(data: Dataset, digest: str, context: str) -> None:
    """Log ``data`` as an input of the active run (the UI's Datasets panel): name, digest, source, schema.

    ``digest`` is the content hash also logged as the ``data_digest`` parameter; ``context`` says
    what the run did with it ('training', 'evaluation', 'validation').
    """
    with warnings.catch_warnings():
        # a local path matches the two LocalArtifactDatasetSource registrations ('' and 'file'); either is right
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        # mlflow profiles an ndarray only (shape, size, bytes); a sparse matrix is described by a dense stand-in
        # of its shape and dtype that takes no memory (zero strides)
        features = np.broadcast_to(np.zeros((), data.x.dtype), data.x.shape) if sparse.issparse(data.x) else data.x
        dataset = mlflow.data.from_numpy(features, targets=data.y, name=data.name, digest=digest,
                                         source=data.source or None)
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as e:
        # MLflow's store looks the dataset up, then inserts it if it was missing: two runs logging the same data at the
        # same moment (two jobs on one tracking server) collide on its unique key; the second try finds the row
        if not any(word in str(e).lower() for word in ("unique constraint", "duplicate")):
            raise
        mlflow.log_input(dataset, context=context)


def log_params_once(params: dict[str, object]) -> None:
    """Log ``params`` to the active run, skipping keys already there.

    ``mlflow run`` logs the MLproject parameters itself, as the strings it was given; MLflow refuses
    to change a logged value, so those keep their spelling and only the rest is added.
    """
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    mlflow.log_params({k: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v
                       for k, v in params.items() if k not in existing})


def _current_experiment_id() -> str:
    active = mlflow.active_run()
    if active is not None:
        return active.info.experiment_id
    return os.environ.get("MLFLOW_EXPERIMENT_ID") or mlflow.get_experiment_by_name("Default").experiment_id


def log_autoencoder(pretrained: PretrainedAutoencoder) -> None:
    """Save the pretrained autoencoder checkpoint as an artifact of the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(AUTOENCODER_ARTIFACT).name
        pretrained.save(path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(AUTOENCODER_ARTIFACT).parent))


def load_autoencoder(ref: str) -> PretrainedAutoencoder:
    """Load a pretrained autoencoder from a checkpoint path, a run id, or an artifact URI.

    Accepted: a local ``.pt`` file; a run id (its ``autoencoder/autoencoder.pt``); ``runs:/<id>``
    or any artifact URI naming the checkpoint or a folder that holds ``autoencoder.pt``.
    """
    if Path(ref).is_file():
        return PretrainedAutoencoder.load(ref)
    try:
        if ":/" in ref:  # runs:/..., models:/..., s3://..., file:///...
            local = mlflow.artifacts.download_artifacts(artifact_uri=ref)
        else:
            local = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=AUTOENCODER_ARTIFACT)
    except MlflowException as e:
        raise ValueError(f"autoencoder {ref!r} could not be loaded: {e.message.splitlines()[0]}") from e
    local_path = Path(local)
    if local_path.is_dir():
        found = sorted(local_path.rglob(Path(AUTOENCODER_ARTIFACT).name))
        if not found:
            raise ValueError(f"autoencoder {ref!r}: no {Path(AUTOENCODER_ARTIFACT).name} under that URI")
        local_path = found[0]
    return PretrainedAutoencoder.load(local_path)


def log_network(network: DECNet) -> None:
    """Save the trained DEC network checkpoint as an artifact of the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(NETWORK_ARTIFACT).name
        settings = {k: v for k, v in network.checkpoint().items() if k != "state_dict"}
        save_tensors(path, network.state_dict(), settings)  # tensors + JSON: loading runs no code
        mlflow.log_artifact(str(path), artifact_path=str(Path(NETWORK_ARTIFACT).parent))


def load_network(run_id: str) -> DECNet:
    """The DEC network a ``cluster`` run saved."""
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=NETWORK_ARTIFACT)
    except MlflowException as e:
        raise ValueError(f"run_id {run_id!r} has no {NETWORK_ARTIFACT} (is it a cluster run?): {e.message.splitlines()[0]}") from e
    tensors, settings = load_tensors(local)  # refuses a file that needs pickle code execution
    try:
        return DECNet.from_checkpoint({**settings, "state_dict": tensors})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"run_id {run_id!r}: {NETWORK_ARTIFACT} is not a DEC network checkpoint: {str(e).splitlines()[0]}") from None


def set_model_version_tags(name: str, version: str, tags: dict[str, object]) -> None:
    """Tag a registered model version (the UI's version page shows them; searches can filter on them)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def describe_model(name: str, version: str, *, model_description: str, version_description: str) -> None:
    """Set a registered version's description, and the registered model's when it has none yet."""
    client = MlflowClient()
    client.update_model_version(name, version, description=version_description)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=model_description)


def load_pyfunc(uri: str) -> mlflow.pyfunc.PyFuncModel:
    """The DEC model at ``uri``, run by the installed serving code: nothing stored with the model is
    executed (``serving.loading``); ValueError naming the URI when it cannot be loaded."""
    from serving.loading import load_dec_model  # onnxruntime: import on use

    return load_dec_model(uri)


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of each metric of run ``run_id``."""
    return dict(MlflowClient().get_run(run_id).data.metrics)


def _model_versions(name: str) -> list:
    """Every registered version of model ``name``; ValueError if there is none."""
    try:
        escaped = name.replace("'", "\\'")  # the filter string quotes the name
        versions = MlflowClient().search_model_versions(f"name = '{escaped}'")
    except MlflowException as e:
        raise ValueError(f"model_name {name!r}: {e.message.splitlines()[0]}") from e
    if not versions:
        raise ValueError(f"model_name {name!r} has no registered versions")
    return versions


def _version_metrics(versions, metric: str) -> list[tuple[float, int]]:
    """(value, version) of each version whose source run logged a finite ``metric``."""
    client = MlflowClient()
    scored = []
    for v in versions:
        value = client.get_run(v.run_id).data.metrics.get(metric) if v.run_id else None
        if value is not None and np.isfinite(value):
            scored.append((value, int(v.version)))
    return scored


def every_version_has_metric(name: str, metric: str) -> bool:
    """True when the source run of every registered version of ``name`` logged ``metric``."""
    versions = _model_versions(name)
    return len(_version_metrics(versions, metric)) == len(versions)


def promote(name: str, metric: str, *, greater_is_better: bool = True, alias: str = "champion") -> dict:
    """Point ``alias`` at the version of registered model ``name`` with the best ``metric``.

    The metric is read from each version's source run. Returns a dict with the chosen version,
    the metric, its value and the version the alias named before (or None).

    Raises
    ------
    ValueError if the model does not exist or no version's run logged ``metric``.
    """
    client = MlflowClient()
    scored = _version_metrics(_model_versions(name), metric)
    if not scored:
        raise ValueError(f"metric {metric!r} was not logged by any run behind model {name!r}")
    value, version = (max if greater_is_better else min)(scored)
    try:
        previous = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        previous = None
    client.set_registered_model_alias(name, alias, str(version))
    return {"version": str(version), "metric": metric, "value": value, "previous": previous}


def self_training_recorder(x: Features, y: np.ndarray | None, pretrained: PretrainedAutoencoder, *,
                           alpha: float, sample_size: int, seed: int) -> SelfTrainRecorder:
    """A recorder of ``sample_size`` random points of raw ``x``, scaled as the encoder sees them."""
    idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=min(sample_size, x.shape[0]), replace=False))
    x_sub = torch.from_numpy((dense(x, idx) - pretrained.offset) * pretrained.scale)
    return SelfTrainRecorder(x_sub, None if y is None else y[idx], y_full=y, alpha=alpha)


def log_self_training_figures(recorder: SelfTrainRecorder, *, tol: float, seed: int) -> None:
    """The paper's self-training figures, as artifacts of the active run (see :func:`log_figure`).

    ``self_training_tsne.png`` (t-SNE of the subsample at 4 points of self-training, Figure 5),
    ``self_training_curves.png`` (label change, KL and accuracy per update) and
    ``gradient_vs_q.png`` (|dL/dz_i| against q_ij at the start, Figure 4).
    """
    from dec_mlflow import plots  # matplotlib and t-SNE: import on use

    if not recorder.snapshots:
        return
    log_figure("self_training_tsne.png", lambda: plots.embedding_snapshots_figure(recorder.snapshots, recorder.y, random_state=seed))
    log_figure("self_training_curves.png", lambda: plots.self_training_curves_figure(recorder.history, tol=tol))
    log_figure("gradient_vs_q.png", lambda: plots.gradient_vs_q_figure(recorder.gradient["q"], recorder.gradient["grad_norm"]))


def log_figure(name: str, draw: Callable[[], object]) -> None:
    """Log the figure ``draw()`` makes as the artifact ``name`` of the active run; a figure never fails the run.

    A figure drawn simplified (``plots.FigureWarning``: an embedding t-SNE cannot lay out, such as identical
    points) or not drawn at all because its data made drawing fail (ValueError, ArithmeticError, RuntimeError) is
    reported in the run as the tag ``dec.figure_warning.<name>`` and on stderr, and the stage goes on: the
    model, metrics and other artifacts of a finished training matter more than one picture of it.
    """
    import matplotlib.pyplot as plt

    from dec_mlflow.plots import FigureWarning

    notes, figure = [], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FigureWarning)
        try:
            figure = draw()
        except (ValueError, ArithmeticError, RuntimeError) as e:
            notes.append(f"not drawn: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    for w in caught:
        if issubclass(w.category, FigureWarning):
            notes.append(str(w.message))
        else:  # not ours to judge: pass it on as if it had not been recorded
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if figure is not None:
        mlflow.log_figure(figure, name)
        plt.close(figure)
    if notes:
        message = "; ".join(dict.fromkeys(notes))  # one note per reason, in order
        mlflow.set_tag(f"{FIGURE_WARNING_TAG}.{name}", message[:5000])
        print(f"Warning: {name}: {message}", file=sys.stderr, flush=True)
