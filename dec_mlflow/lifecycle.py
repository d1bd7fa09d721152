"""The lifecycle's stages as plain functions: pretrain, cluster, evaluate, export, promote, score.

Each stage takes parameters, does its work in one MLflow run (promote starts none) and returns a
dict with the run id and what the run made (model URI, registered version, metrics). ``cli.py``
parses options and calls one stage; tests and notebooks call the stages directly. The paper's
experiments (compare, k_sweep, imbalance) are stages of :mod:`dec_mlflow.lifecycle_experiments`.

Estimator parameters are the keyword arguments of :class:`~dec_mlflow.estimator.DEC`, declared once in
:data:`dec_mlflow.params.PARAMS` (whose rules the stages check too), with ``scaling='auto'`` meaning the dataset's own default, an empty
``image_shape`` the dataset's own, and ``augment``, ``init`` and ``pretrain_epochs`` left at 'auto'
what the stage's ``preset`` chooses (:mod:`dec_mlflow.presets`). Parameters are checked before any
data is loaded. Errors a user can cause raise ``ValueError`` naming the
parameter or file and the rule (``DataError`` for data), or ``FloatingPointError`` when training
diverges; a run ends FAILED on any error.

``pretrain`` and ``cluster`` take ``nproc``: with N > 1 the stage starts its run, runs itself as N
processes with torchrun (:func:`dec_mlflow.distributed.launch`) and ends the run FAILED if any of
them fails. Inside torchrun (those N processes, or ranks that a user's own ``torchrun`` started on
several machines) every rank loads the data and trains on its share; rank 0 alone talks to MLflow.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from sklearn.base import clone

from dec_mlflow import __version__ as PACKAGE_VERSION
from dec_mlflow import distributed, scoring, tracking
from dec_mlflow.callbacks import Callback, CallbackList, ProgressBar
from dec_mlflow.checkpoint import FORMAT as CHECKPOINT_FORMAT
from dec_mlflow.data import Dataset, load_dataset
from dec_mlflow.estimator import DEC, TRUST_SCORE, PretrainedAutoencoder
from dec_mlflow.initialisation import VALLEY_DEPTH, describe_k_choice, supported_cuts
from dec_mlflow.metrics import clustering_scores
from dec_mlflow.params import DEFAULTS as _DEC_DEFAULTS
from dec_mlflow.params import Augment, Integer, validate
from dec_mlflow.pretraining import selection_criteria
from dec_mlflow.rows import Features, dense
from dec_mlflow.presets import preset_params

# Options whose 'auto' the preset decides (else the estimator's default).
PRESET_CHOICES = ("augment", "init", "pretrain_epochs", "distill_epochs", "distill_rounds")
# The estimator's parameters and their defaults at the stages: 'auto' scaling is resolved per dataset,
# an empty image_shape is the dataset's, and 'auto' preset choices are the preset's.
ESTIMATOR_DEFAULTS = {**_DEC_DEFAULTS, "scaling": "auto", "image_shape": "", **{n: "auto" for n in PRESET_CHOICES}}
ESTIMATOR_PARAMS = tuple(ESTIMATOR_DEFAULTS)
# The parameters that decide a pretrained autoencoder: with the data digest, the key under which a
# finished pretrain run is reused.
PRETRAIN_PARAMS = (
    "hidden_dims", "scaling", "pretrain_mode", "pretrain_epochs", "layerwise_epochs", "pretrain_batch_size",
    "pretrain_lr", "pretrain_momentum", "pretrain_lr_schedule", "dropout", "precision", "augment", "image_shape",
    "random_state",
)
PRETRAIN_STAGE_PARAMS = PRETRAIN_PARAMS + ("device",)  # what the pretrain stage takes
# The autoencoder source of a fit without pretraining (tag dec.autoencoder_source)
UNTRAINED = "none (pretrain_epochs=0: untrained encoder, initial clusters from the input)"
MODEL_ARTIFACT = "model"  # name of the logged pyfunc model in cluster and export runs
ONNX_CHECK_ROWS = 2000  # rows on which the ONNX graph is compared with PyTorch before it is logged
# stopped pretrain runs tried in turn when other processes take over the same ones at the same time; then start over
TAKE_OVER_ATTEMPTS = 3
# The cluster run's summary metrics that tag and describe its registered version (a label-free
# quality score logged by cluster belongs here too, so that the registry shows it without labels).
VERSION_METRIC_PREFIXES = ("final_", "trust_score")
# n_clusters='auto': the run's tag with a sentence on how k was chosen (:func:`log_k_choice`)
K_CHOICE_TAG = "dec.k_choice"


# ------------------------------------------------------------------------------------ helpers
def report(message: str) -> None:
    """Progress for the person watching (stderr, like the progress bar); results go in the return values."""
    print(message, file=sys.stderr, flush=True)


@contextmanager
def progress_bar() -> Iterator[ProgressBar]:
    """A progress bar closed even when training raises, so the error message starts on its own line."""
    bar = ProgressBar()
    try:
        yield bar
    finally:
        bar.close()


def estimator_params(params: dict, names: tuple[str, ...] = ESTIMATOR_PARAMS) -> dict:
    """``params`` completed with the defaults of ``names``; a name outside ``names`` is refused."""
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; this stage takes {', '.join(names)}")
    return {name: params.get(name, ESTIMATOR_DEFAULTS[name]) for name in names}


def build_estimator(params: dict, data: Dataset | None = None, *, preset: str = "default") -> DEC:
    """The validated estimator for ``params``, its stage-level defaults filled in.

    'auto' scaling becomes the dataset's own default (which may be 'auto', the estimator's rule),
    an empty ``image_shape`` the dataset's (e.g. 28x28 for MNIST; a string such as '28,28' is
    parsed), and ``augment``, ``init``, ``pretrain_epochs``, ``distill_epochs`` and ``distill_rounds`` left at 'auto' what ``preset``
    chooses for that image shape, else the estimator's defaults. Called once before the data is
    loaded (``data`` None), so parameter errors come before any work, and again with the dataset.
    """
    dims = params.get("hidden_dims", ESTIMATOR_DEFAULTS["hidden_dims"])
    params = {**params, "hidden_dims": dims if isinstance(dims, str) else tuple(dims)}  # a str is refused by validation
    image_shape = _image_shape(params.get("image_shape", ""))
    if image_shape == "auto" and data is not None and data.image_shape is not None:
        image_shape = data.image_shape
    chosen = preset_params(preset)
    for name in PRESET_CHOICES:
        if params.get(name, "auto") == "auto":
            params[name] = chosen.get(name, _DEC_DEFAULTS[name])
    params["augment"] = Augment.from_text(params["augment"])
    params["image_shape"] = image_shape
    if params.get("scaling") == "auto" and data is not None:
        params["scaling"] = data.default_scaling
    est = DEC().set_params(**params)
    validate(est.get_params(), stage=True)  # the estimator's rules, and random_state an int: runs are named by it
    return est


def _image_shape(value) -> tuple[int, ...] | str | None:
    """``image_shape`` as given: '' or 'auto' (the dataset's, else inferred: 'auto'), 'none' (None: not
    images), '28,28', or a sequence of ints."""
    if value is None or value == "" or value == "auto":
        return "auto"
    if isinstance(value, str) and value.lower() == "none":
        return None
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.split(","))
        except ValueError:
            raise ValueError(f"image_shape must be comma-separated integers such as 28,28 or 32,32,3; got {value!r}") from None
    return tuple(value)


def resolved_params(est: DEC, x: Features, *, pretraining: bool = False) -> dict:
    """What the stage-level and estimator 'auto' settings resolved to, as params ``<name>_resolved``
    (precision, device, image_shape and augment among them; ``pretraining``: for the pretrain
    stage, which always pretrains), and the package version ``dec_mlflow_version``."""
    values = {**{n: est.get_params()[n] for n in ("init", "distill_epochs", "distill_rounds")},
              **est.resolve(x, pretraining=pretraining)}
    resolved = {f"{k}_resolved": ",".join(map(str, v)) if isinstance(v, tuple) else ("none" if v is None else v)
                for k, v in values.items()}
    return {**resolved, "dec_mlflow_version": PACKAGE_VERSION}


def load_data(dataset: str, label_column: str | None = "", n_clusters: int | None = None) -> Dataset:
    """The validated dataset (a known name or a file path); '' or None: no label column."""
    return load_dataset(dataset, label_column=label_column or None, n_clusters=n_clusters)


def check_fit_data(est: DEC, data: Dataset, dataset: str) -> None:
    """Refuse data that ``est`` could not train on (``DEC.check_fit_data``: too few rows for ``n_clusters``, no
    spread at all, ...) before any run or pretraining starts; the ValueError names ``dataset``."""
    try:
        est.check_fit_data(data.x)
    except ValueError as e:
        raise ValueError(f"dataset {dataset!r}: {e}") from None


def data_params(data: Dataset) -> dict:
    """What identifies the data of a run, logged as params (the digest is a hash of the features)."""
    return {"dataset_name": data.name, "data_digest": tracking.data_digest(data.x),
            "n_samples": data.x.shape[0], "n_features": data.x.shape[1]}


def check_int(name: str, value, *, low: int) -> None:
    """ValueError naming ``name`` unless ``value`` is an integer >= ``low``."""
    Integer(low).check(name, value)


def fmt_scores(scores: dict) -> str:
    """'ACC 0.9000  NMI 0.8000  ARI 0.7000' from {'acc': 0.9, ...}."""
    return "  ".join(f"{k.upper()} {v:.4f}" for k, v in scores.items())


def _pretrain_key(est: DEC, digest: str, resolved: dict) -> str:
    """Fingerprint of what decides a pretrained autoencoder, the key under which a pretrain run is reused.

    Data content, pretraining settings, and what ``resolved`` (``est.resolve(x)``) says they became
    here: the matmul precision (``precision='auto'`` is bf16 on one CPU, fp32 on another) and the
    device type (cpu or cuda; not its index). The package version and checkpoint format are part
    of it too, so an autoencoder trained by other code, or whose artifact this version refuses to
    load (pickled checkpoints of older versions), is never reused as if it were identical.
    """
    params = est.get_params()
    params["augment"] = params["augment"] is True  # 'finetune' and 'distill' pretrain on clean images, as False does
    return tracking.fingerprint({"data_digest": digest, "checkpoint_format": CHECKPOINT_FORMAT,
                                 "package_version": PACKAGE_VERSION, "precision_resolved": resolved["precision"],
                                 "device_type": resolved["device"].split(":")[0],
                                 **{k: params[k] for k in PRETRAIN_PARAMS}})


# ------------------------------------------------------------------------------------ pretrain
def pretrain(dataset: str, *, label_column: str = "", preset: str = "default", experiment: str = "", nproc: int = 1,
             **params) -> dict:
    """Pretrain the autoencoder on ``dataset`` in a new run.

    Reads the dataset; writes a run with the per-epoch ``pretrain_loss`` curve, the dataset as an
    input and the artifact ``autoencoder/autoencoder.pt`` (weights + input scaling).

    Parameters
    ----------
    dataset : str
        A known dataset name or a path to a .npy/.npz/.csv/.parquet file.
    label_column : str
        Label column of a table (labels are not used by pretraining).
    preset : {'default', 'best', 'paper'}
        Named recipe for the parameters left at 'auto' (:mod:`dec_mlflow.presets`).
    experiment : str
        MLflow experiment name ('' : MLflow's choice, see ``tracking.stage_run``).
    nproc : int
        Training processes on this machine (torchrun); 1 trains in this process.
    **params
        ``PRETRAIN_STAGE_PARAMS`` of the estimator; the rest keep their defaults.

    Returns
    -------
    dict with ``run_id``, ``autoencoder_uri`` and ``loss`` (last epoch's reconstruction loss); with
    ``nproc`` > 1, ``run_id`` and ``nproc`` (rank 0 printed and logged the rest); on a rank > 0 of
    torchrun, ``run_id`` None and ``rank``.
    """
    params = estimator_params(params, PRETRAIN_STAGE_PARAMS)
    check_int("nproc", nproc, low=1)
    build_estimator(params, preset=preset)
    stage_params = {"dataset": dataset, "label_column": label_column, "preset": preset, **params}
    data = load_data(dataset, label_column)
    est = build_estimator(params, data, preset=preset)
    check_fit_data(est, data, dataset)
    run_name = f"pretrain-{data.name}-s{est.random_state}"
    if nproc > 1 and not distributed.in_torchrun():
        del data  # each rank loads its own
        return _launch("pretrain", run_name, {**stage_params, "experiment": experiment, "nproc": nproc})
    nproc = distributed.local_world_size()  # under torchrun, its processes per machine; else 1
    with distributed.process_group(est.device):
        if not distributed.is_main():
            est.pretrain(data.x)
            return {"run_id": None, "rank": distributed.rank()}
        with tracking.stage_run(run_name, experiment) as run:
            ae = _run_pretraining(est, data, {**stage_params, "nproc": nproc}, data_params(data))
    run_id = run.info.run_id
    return {"run_id": run_id, "autoencoder_uri": f"runs:/{run_id}/{Path(tracking.AUTOENCODER_ARTIFACT).parent}", "loss": ae.loss}


def _run_pretraining(est: DEC, data: Dataset, stage_params: dict, data_params_: dict) -> PretrainedAutoencoder:
    """Pretrain inside the active run and log params, dataset, loss curve and the autoencoder artifact.

    Checkpoints go to the run every ``tracking.CHECKPOINT_EVERY`` epochs. A run of the same work
    (same key) that stopped before finishing, killed or failed, is resumed from its checkpoint
    (:func:`_resume_point`).
    """
    key = _pretrain_key(est, data_params_["data_digest"], est.resolve(data.x))
    mlflow.set_tags({tracking.STAGE_TAG: "pretrain", tracking.KEY_TAG: key,
                     "dataset": data.name, "method": f"pretrain-{est.pretrain_mode}", "seed": est.random_state})
    with tracking.heartbeat():
        tracking.log_params_once({**stage_params, **data_params_, **resolved_params(est, data.x, pretraining=True),
                                  "world_size": distributed.world_size()})
        tracking.log_dataset(data, data_params_["data_digest"], context="training")
        # under torchrun the other ranks pretrain from scratch in step with rank 0, so a checkpoint is not resumed there
        resume = _resume_point(key) if distributed.world_size() == 1 else None
        callbacks = [tracking.MlflowCallback(est.n_clusters), tracking.CheckpointCallback()]
        with progress_bar() as bar:
            ae = est.pretrain(data.x, callback=CallbackList([bar, *callbacks]), resume=resume)
        tracking.log_params_once({"pretrain_lr_resolved": ae.lr})
        mlflow.log_metric("final_pretrain_loss", ae.loss)
        tracking.log_autoencoder(ae)
    return ae


def _resume_point(key: str):
    """The checkpoint of the newest stopped pretrain run with ``key``, taken over by the active run; or None.

    The stopped run is left KILLED (if it was still RUNNING: its process died) and tagged
    ``dec.resumed_by``; the active run is tagged ``dec.resumed_from_run``, logs the params
    ``resumed_from_run``, ``resumed_from_stage`` and ``resumed_from_epoch`` and gets the stopped
    run's curves up to the checkpoint. When another process takes the same run over at the same time,
    exactly one of them resumes it (``tracking.take_over``); the other looks for another stopped run, else
    pretrains from the start. A checkpoint that cannot be read (cut short by the kill) is reported and
    pretraining starts over.
    """
    active = mlflow.active_run().info.run_id
    for _ in range(TAKE_OVER_ATTEMPTS):
        stopped = tracking.find_resumable_run("pretrain", key, by_run_id=active)
        if stopped is None:
            return None
        if stopped.info.run_id in tracking.take_over([stopped], active):  # taken over, whether resumable or not
            break
        report(f"Not resuming pretrain run {stopped.info.run_id}: another process is taking it over")
    else:
        return None
    run_id = stopped.info.run_id
    try:
        checkpoint = tracking.load_checkpoint(run_id)
    except ValueError as e:
        report(f"Not resuming pretrain run {run_id} ({stopped.info.status}): {e}; pretraining from the start")
        return None
    mlflow.set_tag(tracking.RESUMED_FROM_TAG, run_id)
    position = checkpoint.state
    tracking.log_params_once({"resumed_from_run": run_id, "resumed_from_stage": position.stage,
                              "resumed_from_epoch": position.epoch})
    tracking.copy_pretraining_history(run_id, checkpoint)
    report(f"Resuming pretrain run {run_id} ({stopped.info.status}) from its checkpoint: "
           f"{position.stage} epoch {position.epoch}, in run {active}")
    return checkpoint


def resolve_autoencoder(ref: str, est: DEC, data: Dataset, stage_params: dict, data_params_: dict, *,
                        required: bool = False):
    """The autoencoder named by ``ref``, else a matching finished pretrain run's, else a new child run's.

    ``ref`` is a run id, a ``runs:/`` or ``models:/`` URI, or a checkpoint file; '' to look for or
    make one. ``stage_params`` are the calling stage's parameters (its pretraining ones are logged
    by a new pretrain run). When ``est`` does without pretraining (``pretrain_epochs`` resolves to 0
    in ``fit``) and the caller does not require a pretrained one, the untrained autoencoder of the
    fit, with source ``UNTRAINED``. Returns (autoencoder, source) with source the ref or the
    ``runs:/`` URI of the pretrain run. Under torchrun this runs on rank 0, which sends the
    autoencoder it found to the other ranks (:func:`_shared_autoencoder`), or None to pretrain with them.
    """
    if ref:
        looks_like_file = Path(ref).suffix or "/" in ref or "\\" in ref
        if ":/" not in ref and looks_like_file and not Path(ref).is_file():
            raise ValueError(f"autoencoder {ref!r}: no such file (give a checkpoint file, a run id or a runs:/ or models:/ URI)")
        return distributed.broadcast_object(tracking.load_autoencoder(ref)), ref
    if not required and est.resolve(data.x)["pretrain_epochs"] == 0:
        return distributed.broadcast_object(est.untrained_autoencoder(data.x)), UNTRAINED
    previous = tracking.find_finished_run("pretrain", _pretrain_key(est, data_params_["data_digest"], est.resolve(data.x)))
    if previous is not None:
        report(f"Reusing autoencoder of FINISHED pretrain run {previous.info.run_id}")
        return distributed.broadcast_object(tracking.load_autoencoder(previous.info.run_id)), f"runs:/{previous.info.run_id}"
    distributed.broadcast_object(None)  # the ranks pretrain together
    with tracking.child_run(f"pretrain-{data.name}-s{est.random_state}") as child:
        pretrain_params = {k: v for k, v in stage_params.items() if k in PRETRAIN_STAGE_PARAMS + ("dataset", "label_column", "preset")}
        pretrain_params["random_state"] = est.random_state
        ae = _run_pretraining(est, data, pretrain_params, data_params_)
    return ae, f"runs:/{child.info.run_id}"


def select_autoencoder(est: DEC, data: Dataset, stage_params: dict, data_params_: dict):
    """``n_pretrain_init`` candidates (each its own reusable pretrain run); keep the best, label-free.

    Sets ``est.random_state`` to the kept candidate's seed, so the fit that follows is the one
    ``DEC(n_pretrain_init=...).fit`` would make. Logs each candidate's criteria as metrics
    (step = seed) and ``selected_seed``. Returns (autoencoder, source) as ``resolve_autoencoder``.
    """
    best = None
    for seed in range(est.random_state, est.random_state + est.n_pretrain_init):
        candidate = clone(est).set_params(random_state=seed)
        ae, source = resolve_autoencoder("", candidate, data, stage_params, data_params_)
        criteria = selection_criteria(ae, data.x, est.n_clusters, n_init=est.n_init, seed=seed)
        mlflow.log_metrics({f"candidate_{name}": v for name, v in criteria.items()}, step=seed)
        if best is None or criteria[est.pretrain_selection] < best[0]:
            best = (criteria[est.pretrain_selection], seed, ae, source)
    _, seed, ae, source = best
    distributed.broadcast_object(seed)
    report(f"Kept the autoencoder of seed {seed} (lowest {est.pretrain_selection})")
    mlflow.log_metric("selected_seed", seed)
    est.set_params(random_state=seed)
    return ae, source


def _shared_autoencoder(est: DEC, data: Dataset) -> PretrainedAutoencoder:
    """On a rank > 0: the autoencoder rank 0 found (``resolve_autoencoder``), else pretrained together."""
    ae = distributed.broadcast_object(None)
    return ae if ae is not None else est.pretrain(data.x)


def _follow_cluster(est: DEC, data: Dataset, autoencoder: str) -> None:
    """A rank > 0 of ``cluster``: the collectives of rank 0's ``resolve``/``select_autoencoder`` and ``fit``."""
    if autoencoder or est.n_pretrain_init == 1:
        ae = _shared_autoencoder(est, data)
    else:
        seeds = range(est.random_state, est.random_state + est.n_pretrain_init)
        candidates = {seed: _shared_autoencoder(clone(est).set_params(random_state=seed), data) for seed in seeds}
        est.set_params(random_state=distributed.broadcast_object(None))
        ae = candidates[est.random_state]
    est.fit(data.x, autoencoder=ae, callback=Callback())


def _launch(stage: str, run_name: str, options: dict) -> dict:
    """Start the run of ``stage``, run the stage as ``options['nproc']`` torchrun processes in it, wait.

    ``options`` are the stage's keyword arguments, passed on as the command's options; rank 0
    resumes the run (its id is in the environment of the ranks). The run and the runs nested in it
    end FAILED when any rank fails (``distributed.WorkerFailed``), even one killed before it could say so.
    """
    args = [stage]
    for name, value in options.items():
        if isinstance(value, (tuple, list)):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = str(value).lower()
        args += [f"--{name}", "" if value is None else str(value)]
    with tracking.stage_run(run_name, options["experiment"]) as run, tracking.run_environment(run):
        report(f"Running {stage} as {options['nproc']} processes (torchrun) in run {run.info.run_id}")
        try:
            distributed.launch(options["nproc"], "dec_mlflow.cli", args)
        except BaseException as e:
            # every rank has stopped; rank 0 may not have ended its child runs (killed, or stopped by
            # torchrun's SIGTERM while it was ending them after its peer's death)
            tracking.end_open_children(run.info.run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
    return {"run_id": run.info.run_id, "nproc": options["nproc"]}


# ------------------------------------------------------------------------------------ cluster
def cluster(dataset: str, *, label_column: str = "", autoencoder: str = "", registered_model_name: str = "",
            figure_sample_size: int = 1000, preset: str = "default", experiment: str = "", nproc: int = 1,
            **params) -> dict:
    """The main job: pretrain or reuse an autoencoder, initial clusters, DEC self-training, log and register.

    Reads the dataset; writes a run with the self-training curves, the dataset as an input,
    ``network/dec_network.pt``, ``cluster_sizes.json``, the self-training figures and the ONNX
    pyfunc model ``model``, registered as ``registered_model_name`` (default ``dec-<dataset>``;
    'none' skips registration) with a description; a child pretrain run if it had to pretrain.

    Parameters
    ----------
    dataset, label_column, experiment : str
        As for :func:`pretrain`; labels only feed metrics.
    autoencoder : str
        Pretrained autoencoder: run id, ``runs:/`` or ``models:/`` URI, or checkpoint file. '':
        reuse a matching FINISHED pretrain run of the experiment, else pretrain now.
    registered_model_name : str
    figure_sample_size : int
        Points recorded for the self-training figures (>= 10).
    preset : {'default', 'best', 'paper'}
        Named recipe for the parameters left at 'auto' (:mod:`dec_mlflow.presets`).
    nproc : int
        Training processes on this machine (torchrun); 1 trains in this process.
    **params
        Estimator parameters (``ESTIMATOR_PARAMS``); the rest keep their defaults.

    Returns
    -------
    dict with ``run_id``, ``model_uri``, ``registered_model_name`` and ``registered_model_version``
    (None when not registered), ``autoencoder_source``, ``onnx_max_abs_dq``, ``onnx_near_ties`` and ``metrics``: the
    run's summary scores (``trust_score`` and the ``trust_*`` scores it is chosen from, always;
    ``final_*`` and ``init_*`` when the data has labels); those matching ``VERSION_METRIC_PREFIXES``
    also tag and describe the registered version. With ``nproc`` > 1, ``run_id`` and ``nproc`` (rank
    0 printed the rest); on a rank > 0 of torchrun, ``run_id`` None and ``rank``.
    """
    params = estimator_params(params)
    check_int("figure_sample_size", figure_sample_size, low=10)
    check_int("nproc", nproc, low=1)
    build_estimator(params, preset=preset)
    data = load_data(dataset, label_column, None if params["n_clusters"] == "auto" else params["n_clusters"])
    est = build_estimator(params, data, preset=preset)
    check_fit_data(est, data, dataset)
    name = registered_model_name or f"dec-{data.name}"
    run_name = f"cluster-{data.name}-k{est.n_clusters}-s{est.random_state}"
    stage_params = {"dataset": dataset, "label_column": label_column, "preset": preset, **params}
    own_params = {"autoencoder": autoencoder, "registered_model_name": registered_model_name,
                  "figure_sample_size": figure_sample_size}
    if nproc > 1 and not distributed.in_torchrun():
        del data  # each rank loads its own
        return _launch("cluster", run_name, {**stage_params, **own_params, "experiment": experiment, "nproc": nproc})
    nproc = distributed.local_world_size()  # under torchrun, its processes per machine; else 1
    with distributed.process_group(est.device):
        if not distributed.is_main():
            _follow_cluster(est, data, autoencoder)
            return {"run_id": None, "rank": distributed.rank()}
        return _cluster_run(est, data, run_name, experiment, name, stage_params, {**own_params, "nproc": nproc})


def _cluster_run(est: DEC, data: Dataset, run_name: str, experiment: str, name: str, stage_params: dict,
                 own_params: dict) -> dict:
    """The run of ``cluster`` (in one process, or on rank 0): see :func:`cluster`."""
    autoencoder, figure_sample_size = own_params["autoencoder"], own_params["figure_sample_size"]
    with tracking.stage_run(run_name, experiment) as run, tracking.heartbeat():
        mlflow.set_tags({tracking.STAGE_TAG: "cluster", "dataset": data.name, "method": "dec", "seed": est.random_state})
        data_params_ = data_params(data)
        # the same job killed before: leave it KILLED rather than RUNNING forever (its pretraining is resumed below)
        key = tracking.fingerprint({**stage_params, "autoencoder": autoencoder, "data_digest": data_params_["data_digest"],
                                    "package_version": PACKAGE_VERSION})
        mlflow.set_tag(tracking.CLUSTER_KEY_TAG, key)
        tracking.take_over(tracking.find_dead_runs("cluster", key, tracking.CLUSTER_KEY_TAG), run.info.run_id)
        tracking.log_params_once({**stage_params, **own_params, **data_params_, **resolved_params(est, data.x),
                                  "world_size": distributed.world_size()})
        tracking.log_dataset(data, data_params_["data_digest"], context="training")
        if autoencoder or est.n_pretrain_init == 1:
            ae, source = resolve_autoencoder(autoencoder, est, data, stage_params, data_params_)
        else:
            ae, source = select_autoencoder(est, data, stage_params, data_params_)
        mlflow.set_tag("dec.autoencoder_source", source)
        recorder = tracking.self_training_recorder(data.x, data.y, ae, alpha=est.alpha, sample_size=figure_sample_size, seed=est.random_state)
        with progress_bar() as bar:
            callbacks = [tracking.MlflowCallback(est.n_clusters, data.y), recorder]
            est.fit(data.x, autoencoder=ae, callback=CallbackList([bar, *callbacks]))
        tracking.log_self_training_figures(recorder, tol=est.tol, seed=est.random_state)
        metrics = _log_cluster_results(est, data)
        tracking.log_network(est.network_)
        scored = {k: v for k, v in metrics.items() if k.startswith(VERSION_METRIC_PREFIXES)}
        summary = f"run {run.info.run_id} ({run.info.run_name}) scored {_describe_metrics(scored)}"
        logged = _log_model(est.network_, data, data_params_["data_digest"], name, {k: f"{v:.4f}" for k, v in scored.items()}, summary)
    return {"run_id": run.info.run_id, "autoencoder_source": source, "metrics": metrics, "k_choice": est.k_choice_, **logged}


def _log_cluster_results(est: DEC, data: Dataset) -> dict:
    """Log sizes, iterations, the label-free trust scores and, with labels, the initial and final scores.

    Returns the scores logged: the run's summary, which tags and describes the registered version.
    """
    sizes = np.bincount(est.labels_, minlength=est.n_clusters_)
    if est.k_scores_:
        log_k_choice(est.n_clusters_, est.k_scores_, est.k_min, est.k_max)
    else:
        tracking.log_params_once({"n_clusters_resolved": est.n_clusters_})
    mlflow.log_dict({"cluster_sizes": sizes.tolist()}, "cluster_sizes.json")
    tracking.log_params_once({"pretrain_lr_resolved": est.resolved_params_["pretrain_lr"],
                              "distill_lr_resolved": est.resolved_params_["distill_lr"]})
    mlflow.log_metrics({"n_iter": est.n_iter_, "converged": float(est.converged_), "pretrain_loss": est.pretrain_loss_})
    metrics = {"trust_score": est.trust_score_, **{f"trust_{k}": v for k, v in est.trust_scores_.items()}}
    mlflow.set_tag("dec.trust_score", f"{TRUST_SCORE}: label-free, higher is better (docs/trust.md, 'How far to trust a run')")
    if data.y is not None:
        final = clustering_scores(data.y, est.labels_)
        init = clustering_scores(data.y, est.init_labels_)
        metrics.update({**{f"final_{k}": v for k, v in final.items()}, **{f"init_{k}": v for k, v in init.items()}})
    mlflow.log_metrics(metrics)
    return metrics


def log_k_choice(k: int, depths: dict[int, float], k_min: int, k_max: int) -> str:
    """Log n_clusters='auto''s choice of ``k`` from the cuts ``depths`` (:func:`dec_mlflow.initialisation.choose_k`)
    on the active run: n_clusters_resolved, every cut's depth as k_valley_depth (step = k), k_selection.png and the
    tag dec.k_choice, the sentence that :func:`dec_mlflow.initialisation.describe_k_choice` returns (and so does this)."""
    from dec_mlflow import plots  # matplotlib: import on use

    tracking.log_params_once({"n_clusters_resolved": k})
    for j, depth in depths.items():
        mlflow.log_metric("k_valley_depth", depth, step=j)
    tracking.log_figure("k_selection.png", lambda: plots.k_selection_figure(depths, k, VALLEY_DEPTH, supported_cuts(depths)))
    sentence = describe_k_choice(k, depths, k_min, k_max)
    mlflow.set_tag(K_CHOICE_TAG, sentence)
    return sentence


def _describe_metrics(metrics: dict) -> str:
    if not metrics:
        return "no accuracy figures (the data has no labels)"
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _log_model(network, data: Dataset, digest: str, name: str, tags: dict, summary: str) -> dict:
    """Export to ONNX, verify, log as the pyfunc model ``model`` and register it (unless name is 'none').

    ``summary`` says where the network comes from and what it scored; it goes into the
    registered version's description. Returns ``model_uri``, ``registered_model_name``,
    ``registered_model_version`` (both None when not registered), ``onnx_max_abs_dq`` and
    ``onnx_near_ties`` (check rows whose labels were not compared, see ``dec_mlflow.export.NEAR_TIE``).
    """
    from serving.model_io import log_dec_model  # onnx / onnxruntime are heavy: import on use

    register = name.lower() != "none"
    tags = {"dataset": data.name, "source_run": mlflow.active_run().info.run_id, **tags}
    # logs the ONNX parity figures as metrics of the run and of the logged model
    info, check = log_dec_model(network, dense(data.x, slice(0, ONNX_CHECK_ROWS)), name=MODEL_ARTIFACT,
                                registered_model_name=name if register else None, tags=tags)
    version = info.registered_model_version if register else None
    if register:
        tracking.set_model_version_tags(name, version, tags)
        n_clusters, n_features = network.centroids.shape[0], network.offset.shape[0]
        tracking.describe_model(
            name, version,
            model_description=(
                f"Deep Embedded Clustering (DEC) into {n_clusters} clusters, trained on {data.name!r}: "
                f"rows of {n_features} raw features in; the cluster `label` and soft assignments q_0..q_{n_clusters - 1} "
                "out, computed by onnxruntime from an ONNX graph. One version per cluster or export run; "
                "the alias `champion` (set by promote) names the best."),
            version_description=(
                f"DEC network of {summary}. Trained on {data.name!r} ({data.x.shape[0]} x {data.x.shape[1]}, "
                f"data digest {digest}, source {data.source or 'unknown'}). ONNX graph checked "
                f"against PyTorch on {int(check['onnx_check_rows'])} rows: max |dq| {check['onnx_max_abs_dq']:.1e}, "
                f"identical labels outside {int(check['onnx_near_ties'])} near-ties."),
        )
    return {"model_uri": info.model_uri, "registered_model_name": name if register else None,
            "registered_model_version": version, "onnx_max_abs_dq": check["onnx_max_abs_dq"],
            "onnx_near_ties": int(check["onnx_near_ties"])}


# ------------------------------------------------------------------------------------ evaluate
def evaluate(model: str, dataset: str, *, label_column: str = "", sample_size: int = 2000, random_state: int = 0,
             experiment: str = "") -> dict:
    """Score a logged model on a labelled dataset, in a new run.

    Reads the model (``models:/`` URI, ``runs:/<id>/model`` or a cluster run id) and the dataset;
    writes a run with ``acc``, ``nmi``, ``ari``, the dataset as an input, ``cluster_sizes.json``,
    ``confusion_matrix.png``, ``cluster_sizes.png``, ``embedding_tsne.png`` (a ``sample_size``
    subsample) and, for images, ``top_images_per_cluster.png``. Predicts in batches no larger than
    the model's ``max_batch_rows``.

    Returns
    -------
    dict with ``run_id``, ``model_uri`` and ``metrics`` (acc, nmi, ari).
    """
    from dec_mlflow import plots  # matplotlib and t-SNE: import on use

    check_int("sample_size", sample_size, low=10)
    check_int("random_state", random_state, low=0)
    data = load_data(dataset, label_column)
    if data.y is None:
        raise ValueError(f"dataset {dataset!r} has no labels; give label_column or an .npz with y")
    uri = model if ":/" in model else f"runs:/{model}/{MODEL_ARTIFACT}"
    pyfunc = tracking.load_pyfunc(uri)
    with tracking.stage_run(f"evaluate-{data.name}", experiment) as run:
        mlflow.set_tags({tracking.STAGE_TAG: "evaluate", "dataset": data.name, "model_uri": uri})
        data_params_ = data_params(data)
        tracking.log_params_once({"model": model, "dataset": dataset, "label_column": label_column,
                                  "sample_size": sample_size, "random_state": random_state, **data_params_})
        tracking.log_dataset(data, data_params_["data_digest"], context="evaluation")
        out = predict_in_batches(pyfunc, data.x, params={"include_embedding": True})
        labels = out["label"].to_numpy()
        q = out.filter(regex=r"^q_\d+$").to_numpy()
        z = out.filter(regex=r"^z_\d+$").to_numpy()
        scores = clustering_scores(data.y, labels)
        mlflow.log_metrics(scores)
        mlflow.log_dict({"cluster_sizes": np.bincount(labels, minlength=q.shape[1]).tolist()}, "cluster_sizes.json")
        tracking.log_figure("confusion_matrix.png", lambda: plots.confusion_figure(data.y, labels))
        tracking.log_figure("cluster_sizes.png", lambda: plots.cluster_sizes_figure(labels, q.shape[1]))
        rng = np.random.default_rng(random_state)
        sub = rng.choice(len(labels), size=min(sample_size, len(labels)), replace=False)
        tracking.log_figure("embedding_tsne.png", lambda: plots.embedding_figure(z[sub], labels[sub], random_state=random_state))
        if data.image_shape is not None:
            tracking.log_figure("top_images_per_cluster.png", lambda: plots.top_images_figure(data.x, q, data.image_shape))
    return {"run_id": run.info.run_id, "model_uri": uri, "metrics": scores}


def predict_in_batches(pyfunc: mlflow.pyfunc.PyFuncModel, x: Features, params: dict | None = None) -> pd.DataFrame:
    """``pyfunc.predict`` over all rows of ``x``, in calls of at most the model's ``max_batch_rows`` rows.

    Rows are sent as float64: current models take any numeric dtype, but those logged before had a
    float64 tensor signature, whose dtype MLflow checks exactly.
    """
    n = x.shape[0]
    limit = int((pyfunc.model_config or {}).get("max_batch_rows") or n)
    frames = [pyfunc.predict(dense(x, slice(start, start + limit)).astype(np.float64), params=params)
              for start in range(0, n, limit)]
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------ export
def export(run_id: str, dataset: str, *, label_column: str = "", registered_model_name: str = "",
           experiment: str = "") -> dict:
    """Re-export a cluster run's network to ONNX, verify it on ``dataset``, log and register it in a new run.

    Reads ``network/dec_network.pt`` of the FINISHED cluster run ``run_id`` and the dataset; writes
    a run with the dataset as an input and the verified ONNX pyfunc model ``model``, registered as
    a new version (default name ``dec-<dataset>``) whose description carries the cluster run's scores.

    Returns
    -------
    dict as :func:`cluster` without ``metrics`` and ``autoencoder_source``.
    """
    network = tracking.load_network(run_id)
    data = load_data(dataset, label_column)
    if data.x.shape[1] != network.offset.shape[0]:
        raise ValueError(f"dataset {dataset!r} has {data.x.shape[1]} features; the model of run_id {run_id!r} expects {network.offset.shape[0]}")
    name = registered_model_name or f"dec-{data.name}"
    with tracking.stage_run(f"export-{data.name}", experiment) as run:
        mlflow.set_tags({tracking.STAGE_TAG: "export", "dataset": data.name, "dec.network_source": f"runs:/{run_id}"})
        data_params_ = data_params(data)
        tracking.log_params_once({"run_id": run_id, "dataset": dataset, "label_column": label_column,
                                  "registered_model_name": registered_model_name, **data_params_})
        tracking.log_dataset(data, data_params_["data_digest"], context="validation")
        scored = {k: v for k, v in tracking.run_metrics(run_id).items() if k.startswith(VERSION_METRIC_PREFIXES)}
        summary = f"cluster run {run_id}, re-exported by run {run.info.run_id}; the cluster run scored {_describe_metrics(scored)}"
        logged = _log_model(network, data, data_params_["data_digest"], name, {"network_run": run_id}, summary)
    return {"run_id": run.info.run_id, **logged}


# ------------------------------------------------------------------------------------ promote
def promote(model_name: str, *, metric: str = "auto", mode: str = "max", alias: str = "champion") -> dict:
    """Point ``alias`` at the registered version of ``model_name`` whose source run has the best ``metric``.

    ``metric='auto'`` ranks by ``final_acc`` when every version's run has labels to compute it,
    else by the label-free ``trust_score`` (higher is better), so runs on unlabelled data are
    promoted by the score that ranks runs without labels. Starts no run. Returns a dict with
    ``version``, ``metric`` (the one used), ``value`` and ``previous`` (the version the alias
    named before, or None).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min'; got {mode!r}")
    if metric == "auto":
        metric = "final_acc" if tracking.every_version_has_metric(model_name, "final_acc") else "trust_score"
        mode = "max"
    return tracking.promote(model_name, metric, greater_is_better=mode == "max", alias=alias)


def score(model: str, input: str, output: str, *, engine: str = "local", id_column: str = "id",  # noqa: A002
          chunk_size: int = scoring.DEFAULT_CHUNK_ROWS, spark_master: str = "", experiment: str = "") -> dict:
    """Batch scoring: every row of ``input`` through the logged model ``model``, into ``output``, in a new run.

    Reads a model URI and a ``.parquet``, ``.csv`` or ``.npy`` file of raw features; writes the
    parquet ``output`` (one row per input row: the id column or ``row``, ``label``, ``q_0..q_{k-1}``)
    with ``engine`` 'local' (this process, ``chunk_size`` rows at a time) or 'spark'
    (``mlflow.pyfunc.spark_udf`` on ``spark_master``, default ``$SPARK_MASTER`` else ``local[*]``);
    see :mod:`dec_mlflow.scoring`. The run logs the parameters, ``n_rows``, ``seconds``,
    ``rows_per_s`` and ``cluster_sizes.json``. Everything is checked, and the model loaded, before
    the run starts.

    Returns
    -------
    dict with ``run_id``, ``output``, ``n_rows``, ``seconds``, ``rows_per_s``, ``cluster_sizes``,
    ``engine`` and ``spark_master`` (the master used, None for the local engine).
    """
    check_int("chunk_size", chunk_size, low=1)
    job = scoring.plan(model, input, output, engine=engine, id_column=id_column, chunk_rows=chunk_size,
                       spark_master=spark_master or None)
    with tracking.stage_run(f"score-{engine}", experiment) as run:
        mlflow.set_tags({tracking.STAGE_TAG: "score", "model_uri": model})
        tracking.log_params_once({"model": model, "input": input, "output": output, "engine": engine,
                                  "id_column": id_column, "chunk_size": chunk_size, "spark_master": spark_master})
        result = scoring.execute(job)
        mlflow.log_metrics({"n_rows": result.n_rows, "seconds": result.seconds, "rows_per_s": result.rows_per_second})
        mlflow.log_dict({"cluster_sizes": result.cluster_sizes}, "cluster_sizes.json")
        if result.spark_master:
            mlflow.set_tag("spark_master", result.spark_master)
    return {"run_id": run.info.run_id, "output": str(result.output), "n_rows": result.n_rows, "seconds": result.seconds,
            "rows_per_s": result.rows_per_second, "cluster_sizes": result.cluster_sizes, "engine": result.engine,
            "spark_master": result.spark_master}
