"""Reusing a pretrain run only when it is the same work, and resuming a killed one from its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sklearn.datasets import make_blobs

from dec_mlflow import DEC, __version__, lifecycle, tracking
from dec_mlflow.callbacks import Callback, CallbackList
from dec_mlflow.checkpoint import PretrainCheckpoint
from dec_mlflow.environment import Stopped, raise_if_stopped, stop_signals

SMALL = {"n_clusters": 3, "hidden_dims": (16, 8, 3), "pretrain_epochs": 3, "pretrain_lr": 0.1, "pretrain_batch_size": 64,
         "batch_size": 64, "update_interval": 10, "n_init": 3, "precision": "fp32", "init": "kmeans"}
PRETRAIN_SMALL = {k: v for k, v in SMALL.items() if k in lifecycle.PRETRAIN_STAGE_PARAMS}
CPU_FP32 = {"precision": "fp32", "device": "cpu"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reuse")
    x, y = make_blobs(300, n_features=12, centers=3, cluster_std=1.0, random_state=0)
    np.savez(tmp / "blobs.npz", x=x.astype(np.float32), y=y)
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    previous, cwd = mlflow.get_tracking_uri(), os.getcwd()
    mlflow.set_tracking_uri(uri)
    os.chdir(tmp)  # artifacts of new experiments go to ./mlruns: here, not in the checkout
    yield {"dir": tmp, "data": str(tmp / "blobs.npz"), "env": env, "uri": uri}
    os.chdir(cwd)
    mlflow.set_tracking_uri(previous)


# ------------------------------------------------------------------------------------ the reuse key
def test_the_pretrain_key_holds_resolved_precision_device_type_and_package_version(monkeypatch):
    est = DEC(**SMALL)
    key = lifecycle._pretrain_key(est, "digest", CPU_FP32)
    assert lifecycle._pretrain_key(est, "digest", {**CPU_FP32, "precision": "bf16"}) != key
    assert lifecycle._pretrain_key(est, "digest", {**CPU_FP32, "device": "cuda"}) != key
    # which card does not change how the numbers are computed; cpu against cuda does
    assert lifecycle._pretrain_key(est, "digest", {**CPU_FP32, "device": "cuda:1"}) == \
        lifecycle._pretrain_key(est, "digest", {**CPU_FP32, "device": "cuda"})
    monkeypatch.setattr(lifecycle, "PACKAGE_VERSION", "0.0.1")
    assert lifecycle._pretrain_key(est, "digest", CPU_FP32) != key


def test_a_pretrain_run_of_another_package_version_is_not_reused(store, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(lifecycle, "PACKAGE_VERSION", "0.0.1")
        old = lifecycle.pretrain(store["data"], experiment="versions", **PRETRAIN_SMALL)
    current = lifecycle.pretrain(store["data"], experiment="versions", **PRETRAIN_SMALL)
    params = {r: MlflowClient().get_run(r).data.params for r in (old["run_id"], current["run_id"])}
    assert params[old["run_id"]]["dec_mlflow_version"] == "0.0.1"
    assert params[current["run_id"]]["dec_mlflow_version"] == __version__
    assert params[current["run_id"]]["precision_resolved"] == "fp32" and params[current["run_id"]]["device_resolved"] == "cpu"
    result = lifecycle.cluster(store["data"], registered_model_name="none", figure_sample_size=50, experiment="versions", **SMALL)
    assert result["autoencoder_source"] == f"runs:/{current['run_id']}"  # the newest of this version's runs
    cluster_params = MlflowClient().get_run(result["run_id"]).data.params
    assert cluster_params["device_resolved"] == "cpu" and cluster_params["dec_mlflow_version"] == __version__
    monkeypatch.setattr(lifecycle, "PACKAGE_VERSION", "9.9.9")  # newer code: neither run may be reused
    result = lifecycle.cluster(store["data"], registered_model_name="none", figure_sample_size=50, experiment="versions", **SMALL)
    assert result["autoencoder_source"] not in (f"runs:/{old['run_id']}", f"runs:/{current['run_id']}")
    child = MlflowClient().get_run(result["autoencoder_source"].removeprefix("runs:/"))
    assert child.data.params["dec_mlflow_version"] == "9.9.9" and child.info.status == "FINISHED"


# ------------------------------------------------------------------------------------ resume
class SaveAt(Callback):
    """Saves the checkpoint offered at (stage, epoch) and counts the epochs run."""

    def __init__(self, stage: str, epoch: int, path: Path):
        self.at, self.path, self.epochs = (stage, epoch), path, 0

    def on_step(self, stage, step, metrics):
        self.epochs += 1

    def on_checkpoint(self, stage, epoch, state):
        if (stage, epoch) == self.at:
            state().save(self.path)


def test_checkpoints_are_written_every_n_epochs_but_at_most_once_per_interval(store, blobs, monkeypatch):
    """Thousands of one-step epochs (small data) must not write thousands of checkpoints."""
    clock = [0.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: clock[0])
    x = np.abs(blobs[0][:64, :16])
    est = DEC(hidden_dims=(8, 4, 2), pretrain_epochs=40, pretrain_lr=0.1, pretrain_batch_size=64, precision="fp32")

    class Clock(Callback):  # each epoch takes 10 s of the fake clock
        def on_step(self, stage, step, metrics):
            clock[0] += 10.0

    class Counted(tracking.CheckpointCallback):  # records the epochs whose state it wrote
        written: list[int] = []

        def on_checkpoint(self, stage, epoch, state):
            super().on_checkpoint(stage, epoch, lambda: (self.written.append(epoch), state())[1])

    # not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID, which the later tests' runs and commands would inherit
    with mlflow.start_run(experiment_id=MlflowClient().create_experiment("cadence")) as run:
        est.pretrain(x, callback=CallbackList([Clock(), Counted(every=2, min_interval_s=60)]))
    assert Counted.written == [2, 8, 14, 20, 26, 32, 38]  # epoch 2, then the first even epoch 60 s after the last
    saved = PretrainCheckpoint.load(MlflowClient().download_artifacts(run.info.run_id, tracking.CHECKPOINT_ARTIFACT))
    assert (saved.state.stage, saved.state.epoch) == ("pretrain", 38)


@pytest.mark.parametrize("params, stage, epoch", [
    ({}, "pretrain", 3),
    ({"pretrain_mode": "layerwise", "layerwise_epochs": 3}, "pretrain/layer2", 2),
    ({"pretrain_mode": "layerwise", "layerwise_epochs": 3}, "pretrain/finetune", 2),
    ({"augment": True, "image_shape": (4, 4), "scaling": "max"}, "pretrain", 4),
], ids=["end_to_end", "layerwise-in-a-layer", "layerwise-in-finetuning", "augmented"])
def test_a_resumed_pretraining_runs_the_remaining_epochs_and_ends_where_the_whole_one_does(blobs, tmp_path, params, stage, epoch):
    x = np.abs(blobs[0][:300, :16])
    est = DEC(hidden_dims=(8, 4, 2), pretrain_epochs=6, pretrain_lr=0.1, pretrain_batch_size=64, precision="fp32", **params)
    whole = SaveAt(stage, epoch, tmp_path / "state.pt")
    uninterrupted = est.pretrain(x, callback=whole)
    checkpoint = PretrainCheckpoint.load(tmp_path / "state.pt")
    assert (checkpoint.state.stage, checkpoint.state.epoch, checkpoint.attempt) == (stage, epoch, 0)
    counter = SaveAt("", 0, tmp_path / "unused.pt")
    resumed = est.pretrain(x, callback=counter, resume=checkpoint)
    layers_before = int(stage[-1]) - 1 if "layer" in stage else (3 if "finetune" in stage else 0)
    assert counter.epochs == whole.epochs - epoch - 3 * layers_before  # only what was left
    for name, value in uninterrupted.autoencoder.state_dict().items():
        assert torch.equal(resumed.autoencoder.state_dict()[name], value), name  # exactly, on the CPU
    assert resumed.loss == uninterrupted.loss


def test_a_checkpoint_of_another_network_or_scaling_is_refused(blobs, tmp_path):
    x = blobs[0][:300]
    est = DEC(hidden_dims=(8, 2), pretrain_epochs=2, pretrain_batch_size=64, precision="fp32")
    est.pretrain(x, callback=SaveAt("pretrain", 1, tmp_path / "state.pt"))
    checkpoint = PretrainCheckpoint.load(tmp_path / "state.pt")
    with pytest.raises(ValueError, match=r"resume: the checkpoint is of an autoencoder \(20, 8, 2\), this pretraining makes \(20, 8, 3\)"):
        est.set_params(hidden_dims=(8, 3)).pretrain(x, resume=checkpoint)
    with pytest.raises(ValueError, match="resume: the checkpoint was made under another input scaling"):
        est.set_params(hidden_dims=(8, 2)).pretrain(x * 2, resume=checkpoint)


def start_cli(store, stage: str, experiment: str, data: str, *options: str, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "dec_mlflow.cli", stage, "--dataset", data, "--experiment", experiment,
            "--hidden_dims", "32,16,3", "--pretrain_epochs", "150", "--pretrain_batch_size", "32", "--pretrain_lr", "0.1",
            "--precision", "fp32", *options]
    env = {**store["env"], "DEC_CHECKPOINT_EVERY": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(log, "w") as out:  # a file, not a pipe: nobody reads the progress bars while the job runs
        return subprocess.Popen(args, cwd=store["dir"], env=env, stdout=out, stderr=subprocess.STDOUT)


def kill_after_first_checkpoint(process: subprocess.Popen, artifacts: Path, log: Path) -> None:
    deadline = time.monotonic() + 900  # generous: a shared machine can be slow to even start python
    while not list(artifacts.glob("*/artifacts/checkpoint/pretrain_state.pt")):
        assert process.poll() is None, f"finished before its first checkpoint: {log.read_text()}"
        assert time.monotonic() < deadline, "no checkpoint after 900 s"
        time.sleep(0.2)
    time.sleep(1.0)  # let it get a few epochs past the checkpoint, which it then loses
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def big_blobs(store) -> str:
    x, y = make_blobs(2000, n_features=12, centers=3, cluster_std=1.0, random_state=1)
    path = store["dir"] / "big_blobs.npz"
    np.savez(path, x=x.astype(np.float32), y=y)
    return str(path)


@pytest.mark.parametrize("stage", ["pretrain", "cluster"])
def test_a_killed_job_started_again_resumes_from_its_checkpoint(store, big_blobs, stage):
    experiment = f"killed-{stage}"
    artifacts = store["dir"] / experiment
    MlflowClient().create_experiment(experiment, artifact_location=str(artifacts))
    options = ("--n_clusters", "3", "--init", "kmeans", "--registered_model_name", "none", "--figure_sample_size", "50",
               "--max_iter", "50") if stage == "cluster" else ()
    first = start_cli(store, stage, experiment, big_blobs, *options, log=store["dir"] / f"{experiment}-1.log")
    kill_after_first_checkpoint(first, artifacts, store["dir"] / f"{experiment}-1.log")
    exp_id = MlflowClient().get_experiment_by_name(experiment).experiment_id
    killed = MlflowClient().search_runs([exp_id])
    assert {r.info.status for r in killed} == {"RUNNING"}  # SIGKILL: nothing could end them
    killed_pretrain = next(r for r in killed if r.data.tags[tracking.STAGE_TAG] == "pretrain")
    log = store["dir"] / f"{experiment}-2.log"
    second = start_cli(store, stage, experiment, big_blobs, *options, log=log)
    second.wait(timeout=1800)
    output = log.read_text()
    assert second.returncode == 0, output
    assert f"Resuming pretrain run {killed_pretrain.info.run_id} (RUNNING) from its checkpoint: pretrain epoch" in output
    runs = {r.info.run_id: r for r in MlflowClient().search_runs([exp_id])}
    resumed = next(r for r in runs.values() if r.data.tags.get(tracking.RESUMED_FROM_TAG) == killed_pretrain.info.run_id)
    epoch = int(resumed.data.params["resumed_from_epoch"])
    assert epoch >= 2 and epoch % 2 == 0 and resumed.data.params["resumed_from_stage"] == "pretrain"
    assert resumed.info.status == "FINISHED"
    # the killed runs (the cluster run too) are KILLED and name the run that took over, none is left RUNNING
    for run in killed:
        after = runs[run.info.run_id]
        assert after.info.status == "KILLED" and after.data.tags[tracking.RESUMED_BY_TAG] in runs
    assert [r.info.status for r in runs.values()].count("RUNNING") == 0
    # one whole curve: the killed run's epochs up to the checkpoint, then the resumed ones
    history = MlflowClient().get_metric_history(resumed.info.run_id, "pretrain_loss")
    assert sorted(m.step for m in history) == list(range(1, 151))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_pretraining_ends_both_runs_killed_and_the_same_command_resumes(store, big_blobs, signum):
    # SIGTERM (timeout, batch schedulers, Kubernetes) used to kill the process at once and leave both runs RUNNING
    experiment = f"signalled-{signum.name}"
    artifacts = store["dir"] / experiment
    MlflowClient().create_experiment(experiment, artifact_location=str(artifacts))
    options = ("--n_clusters", "3", "--init", "kmeans", "--registered_model_name", "none", "--figure_sample_size", "50",
               "--max_iter", "50", "--pretrain_epochs", "30")
    log = store["dir"] / f"{experiment}-1.log"
    first = start_cli(store, "cluster", experiment, big_blobs, *options, log=log)
    deadline = time.monotonic() + 900
    while not list(artifacts.glob("*/artifacts/checkpoint/pretrain_state.pt")):  # in pretraining, past a checkpoint
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    first.send_signal(signum)
    assert first.wait(timeout=120) == 128 + signum, log.read_text()[-3000:]
    output = log.read_text()
    assert output.strip().splitlines()[-1] == (f"Error: stopped by {signum.name}; the runs in progress were ended KILLED "
                                               "(the same command started again resumes pretraining from its last checkpoint)")
    assert "Traceback" not in output
    exp_id = MlflowClient().get_experiment_by_name(experiment).experiment_id
    stopped = {r.data.tags[tracking.STAGE_TAG]: r for r in MlflowClient().search_runs([exp_id])}
    assert {stage: r.info.status for stage, r in stopped.items()} == {"cluster": "KILLED", "pretrain": "KILLED"}
    if signum != signal.SIGTERM:
        return  # resuming from a KILLED run is the same for both signals
    log = store["dir"] / f"{experiment}-2.log"
    second = start_cli(store, "cluster", experiment, big_blobs, *options, log=log)
    assert second.wait(timeout=1800) == 0, log.read_text()[-3000:]
    assert f"Resuming pretrain run {stopped['pretrain'].info.run_id} (KILLED) from its checkpoint" in log.read_text()
    after = {r.info.run_id: r for r in MlflowClient().search_runs([exp_id])}
    assert after[stopped["pretrain"].info.run_id].data.tags[tracking.RESUMED_BY_TAG] in after
    assert sorted(r.info.status for r in after.values()) == ["FINISHED", "FINISHED", "KILLED", "KILLED"]


def interrupt_pretraining(store, monkeypatch, experiment: str):
    """lifecycle.pretrain stopped by Ctrl-C right after its epoch-2 checkpoint; returns the KILLED run."""
    write = tracking.CheckpointCallback.on_checkpoint

    def write_then_interrupt(self, stage, epoch, state):
        write(self, stage, epoch, state)
        if epoch == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setenv("DEC_CHECKPOINT_EVERY", "1")
        m.setattr(tracking, "CHECKPOINT_MIN_INTERVAL_S", 0.0)  # epochs 1 and 2 follow within a second
        m.setattr(tracking.CheckpointCallback, "on_checkpoint", write_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            lifecycle.pretrain(store["data"], experiment=experiment, **PRETRAIN_SMALL)
    exp_id = MlflowClient().get_experiment_by_name(experiment).experiment_id
    run = MlflowClient().search_runs([exp_id], order_by=["attributes.start_time DESC"])[0]
    assert run.info.status == "KILLED" and run.data.tags["dec.checkpoint"] == "pretrain epoch 2"  # stopped, not failed
    return run


def test_an_interrupted_pretraining_is_resumed_and_an_unreadable_checkpoint_means_starting_over(store, monkeypatch, capsys):
    killed = interrupt_pretraining(store, monkeypatch, "interrupted")
    result = lifecycle.pretrain(store["data"], experiment="interrupted", **PRETRAIN_SMALL)
    resumed = MlflowClient().get_run(result["run_id"])
    assert resumed.data.params["resumed_from_epoch"] == "2" and resumed.data.params["resumed_from_run"] == killed.info.run_id
    assert MlflowClient().get_run(killed.info.run_id).data.tags[tracking.RESUMED_BY_TAG] == result["run_id"]
    assert [m.step for m in MlflowClient().get_metric_history(result["run_id"], "pretrain_loss")] == [1, 2, 3]
    # a resumed run is not resumed twice: the next identical pretraining starts from scratch
    again = MlflowClient().get_run(lifecycle.pretrain(store["data"], experiment="interrupted", **PRETRAIN_SMALL)["run_id"])
    assert "resumed_from_epoch" not in again.data.params

    cut = interrupt_pretraining(store, monkeypatch, "interrupted")
    stored = Path(cut.info.artifact_uri.removeprefix("file://")) / tracking.CHECKPOINT_ARTIFACT
    stored.write_bytes(stored.read_bytes()[:100])  # what a kill while copying the artifact could leave
    capsys.readouterr()
    fresh = lifecycle.pretrain(store["data"], experiment="interrupted", **PRETRAIN_SMALL)
    assert f"Not resuming pretrain run {cut.info.run_id} (KILLED): " in capsys.readouterr().err
    assert "resumed_from_epoch" not in MlflowClient().get_run(fresh["run_id"]).data.params
    assert MlflowClient().get_run(cut.info.run_id).data.tags[tracking.RESUMED_BY_TAG] == fresh["run_id"]


# ------------------------------------------------------------------------------------ heartbeat and takeover
def test_the_heartbeat_comes_from_a_timer_while_a_long_stage_makes_no_training_step(store):
    client = MlflowClient()
    with mlflow.start_run(experiment_id=client.create_experiment("heartbeat")) as run:
        with tracking.heartbeat(every_s=0.25):
            tags = client.get_run(run.info.run_id).data.tags
            assert tags[tracking.OWNER_TAG] == tracking.owner()
            first = int(tags[tracking.HEARTBEAT_TAG])
            time.sleep(2.5)  # UMAP + GMM, an export, a slow upload: no step, no checkpoint
            assert int(client.get_run(run.info.run_id).data.tags[tracking.HEARTBEAT_TAG]) >= first + 2
        assert not [t for t in threading.enumerate() if t.name.startswith("dec-heartbeat")]  # stopped with its block
        last = client.get_run(run.info.run_id).data.tags[tracking.HEARTBEAT_TAG]
        time.sleep(1.1)
        assert client.get_run(run.info.run_id).data.tags[tracking.HEARTBEAT_TAG] == last


def test_a_launcher_ends_the_runs_its_stopped_processes_left_running_and_no_other(store):
    client = MlflowClient()
    experiment_id = client.create_experiment("launcher-sweep")
    launcher = client.create_run(experiment_id)
    child = client.create_run(experiment_id, tags={"mlflow.parentRunId": launcher.info.run_id})
    grandchild = client.create_run(experiment_id, tags={"mlflow.parentRunId": child.info.run_id})
    finished = client.create_run(experiment_id, tags={"mlflow.parentRunId": launcher.info.run_id})
    client.set_terminated(finished.info.run_id, "FINISHED")
    other = client.create_run(experiment_id)  # another job's run in the same experiment
    ended = tracking.end_open_children(launcher.info.run_id, "FAILED")
    assert sorted(ended) == sorted([child.info.run_id, grandchild.info.run_id])
    status = {r: client.get_run(r.info.run_id).info.status for r in (launcher, child, grandchild, finished, other)}
    assert [status[r] for r in (launcher, child, grandchild, finished, other)] == [
        "RUNNING", "FAILED", "FAILED", "FINISHED", "RUNNING"]


@pytest.fixture
def takeover(store, monkeypatch):
    """A FAILED run, two live claimant runs of this process, and claims that settle in 1 s."""
    client = MlflowClient()
    experiment = client.create_experiment(f"takeover-{time.monotonic_ns()}")
    stopped = client.create_run(experiment)
    client.set_terminated(stopped.info.run_id, "FAILED")
    claimants = [client.create_run(experiment).info.run_id for _ in range(2)]
    for claimant in claimants:
        client.set_tag(claimant, tracking.OWNER_TAG, tracking.owner())  # alive: this process runs it
    monkeypatch.setenv("DEC_CLAIM_SETTLE_S", "1.0")
    return client.get_run(stopped.info.run_id), claimants


def _claim_in_threads(stopped, claimants, before_write) -> dict[str, list[str]]:
    """Both claimants take ``stopped`` over at once, each in a thread; ``before_write(claimant)`` runs between its
    read of the run and its write of the claim. Returns claimant -> the run ids it took over."""
    real, results, raised = tracking._claim_token, {}, {}

    def token(by_run_id):
        before_write(by_run_id)
        return real(by_run_id)

    def claim(claimant):
        try:
            results[claimant] = tracking.take_over([stopped], claimant)
        except Exception as e:  # noqa: BLE001 - a claimant that crashes fails the test below, not only its thread
            raised[claimant] = e

    with pytest.MonkeyPatch.context() as m:
        m.setattr(tracking, "_claim_token", token)
        threads = [threading.Thread(target=claim, args=(c,)) for c in claimants]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not raised and sorted(results) == sorted(claimants), raised  # every claimant returns, none crashes
    return results


def _assert_taken_over_once(stopped, results: dict[str, list[str]]) -> str:
    winners = [c for c, taken in results.items() if taken == [stopped.info.run_id]]
    assert len(winners) == 1 and sum(map(len, results.values())) == 1, results
    tags = MlflowClient().get_run(stopped.info.run_id).data.tags
    assert tags[tracking.RESUMED_BY_TAG] == winners[0]
    return winners[0]


def test_two_claimants_that_both_find_the_run_free_take_it_over_once(takeover):
    stopped, claimants = takeover
    both_read = threading.Barrier(2)  # neither writes its claim before both have seen the run unclaimed
    results = _claim_in_threads(stopped, claimants, lambda _: both_read.wait(timeout=30))
    winner = _assert_taken_over_once(stopped, results)
    assert MlflowClient().get_run(stopped.info.run_id).data.tags[tracking.CLAIM_TAG].startswith(f"{winner}:")  # the last write


def test_a_claim_the_store_refuses_because_another_was_inserted_at_once_is_given_up(takeover, monkeypatch):
    # the SQL stores insert a run's first tag of a key: of two claimants inserting at the same instant, one is refused
    # (sqlite: UNIQUE constraint failed). Here b's write lands first and a's is refused: a gives up, b takes the run.
    stopped, (a, b) = takeover
    client_set_tag = MlflowClient.set_tag

    def set_tag(self, run_id, key, value, *args, **kwargs):
        if key == tracking.CLAIM_TAG and value.startswith(f"{a}:"):
            client_set_tag(self, run_id, key, f"{b}:its-token")
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: tags.key, tags.run_uuid")
        return client_set_tag(self, run_id, key, value, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_tag", set_tag)
    start = time.monotonic()
    assert tracking.take_over([stopped], a) == []
    assert time.monotonic() - start < 1.0  # gave up at once, without settling
    tags = MlflowClient().get_run(stopped.info.run_id).data.tags
    assert tags[tracking.CLAIM_TAG] == f"{b}:its-token" and tracking.RESUMED_BY_TAG not in tags

    def refused(self, run_id, key, value, *args, **kwargs):
        raise MlflowException("store down")

    other = MlflowClient().create_run(stopped.info.experiment_id)
    MlflowClient().set_terminated(other.info.run_id, "FAILED")
    monkeypatch.setattr(MlflowClient, "set_tag", refused)
    with pytest.raises(MlflowException, match="store down"):  # a refusal with no claim standing is no race: raised
        tracking.take_over([MlflowClient().get_run(other.info.run_id)], a)


def test_a_claim_written_after_the_other_claimant_read_its_own_back_is_given_up(takeover):
    # the interleaving a plain write-wait-read gets wrong: B saw the run free, then wrote only after A had settled and
    # read back its own claim; B reads back its own claim too, and both would resume. B sees its read-then-write took
    # longer than the settle time, and gives up.
    stopped, (a, b) = takeover
    a_done, b_read = threading.Event(), threading.Event()
    real_take_over = tracking.take_over

    def before_write(claimant):  # called between a claimant's read of the run and its write of the claim
        if claimant == a:  # A writes only once B has read the run free (else B would see A's claim settling)
            assert b_read.wait(timeout=30)
        if claimant == b:
            b_read.set()
            assert a_done.wait(timeout=30)

    def take_over(runs, by_run_id):
        try:
            return real_take_over(runs, by_run_id)
        finally:
            if by_run_id == a:
                a_done.set()

    with pytest.MonkeyPatch.context() as m:
        m.setattr(tracking, "take_over", take_over)
        results = _claim_in_threads(stopped, [a, b], before_write)
    assert _assert_taken_over_once(stopped, results) == a
    assert MlflowClient().get_run(stopped.info.run_id).data.tags[tracking.CLAIM_TAG].startswith(f"{b}:")  # written, given up


def test_a_claimant_that_comes_while_another_claim_settles_gives_up_without_writing(takeover):
    stopped, (a, b) = takeover
    results = {}
    first = threading.Thread(target=lambda: results.update({a: tracking.take_over([stopped], a)}))
    first.start()
    while tracking.CLAIM_TAG not in MlflowClient().get_run(stopped.info.run_id).data.tags:
        time.sleep(0.01)
    start = time.monotonic()
    results[b] = tracking.take_over([stopped], b)  # finds a's live claim
    assert time.monotonic() - start < 1.0  # no claim written, no settling
    first.join(timeout=60)
    assert _assert_taken_over_once(stopped, results) == a


def test_a_claim_whose_claimant_is_no_longer_running_does_not_count(takeover):
    stopped, (a, b) = takeover
    client = MlflowClient()
    client.set_tag(stopped.info.run_id, tracking.CLAIM_TAG, f"{a}:0123")
    client.set_terminated(a, "FAILED")  # a claimed, then failed before taking over
    assert tracking.take_over([client.get_run(stopped.info.run_id)], b) == [stopped.info.run_id]
    assert client.get_run(stopped.info.run_id).data.tags[tracking.RESUMED_BY_TAG] == b


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_that_a_library_swallows_is_raised_again_at_the_next_training_step(signum):
    # a library with a bare `except` around the line the signal interrupts would let the job run to its end
    steps = []

    class Steps(Callback):
        def on_step(self, stage, step, metrics):
            steps.append(step)

    hooks, before = CallbackList([Steps()]), {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Stopped) as stopped:
        with stop_signals():
            hooks.on_step("distill", 1, {})
            try:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler raises within this
            except BaseException:
                pass
            hooks.on_step("distill", 2, {})
    assert stopped.value.signum == signum and steps == [1]
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are given back
    raise_if_stopped()  # outside the block the stop is forgotten


def test_a_stop_that_leaves_a_write_holding_the_database_lock_still_ends_the_run_killed(store):
    # A stop signal can strike inside one of MLflow's own writes; the frames of its traceback then hold that
    # write's connection, and with it SQLite's write lock, while the run is being ended KILLED (CI saw this).
    import sqlite3

    db = store["uri"].removeprefix("sqlite:///")
    # an experiment of its own, without set_experiment: that would also set MLFLOW_EXPERIMENT_ID for every later
    # subprocess of the session, pointing the `mlflow run` tests of other stores at an experiment they lack
    experiment_id = MlflowClient().create_experiment("locked-by-a-stopped-write")

    def write_then_stop():
        connection = sqlite3.connect(db, isolation_level=None)  # a local of the interrupted frame, as MLflow's is
        connection.execute("BEGIN IMMEDIATE")  # the write lock, not yet released
        raise Stopped(signal.SIGINT)

    with pytest.raises(Stopped):
        # the parent as stage_run opens it (it ends KILLED on an interrupt), the child as the pretrain stage's
        with mlflow.start_run(experiment_id=experiment_id) as parent, tracking._killed_on_interrupt(), \
                tracking.child_run("locked") as child:
            write_then_stop()
    client = MlflowClient()
    assert client.get_run(child.info.run_id).info.status == "KILLED"
    assert client.get_run(parent.info.run_id).info.status == "KILLED"
