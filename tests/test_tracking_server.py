"""The team tracking server: deploy/tracking-server.sh (PostgreSQL + served artifacts) under real runs.

Two `mlflow run . -e cluster` at the same time against the server, then `promote`, then the champion
loaded through the server; every run, metric, artifact and registered version must be there, in
PostgreSQL and in the served artifact folder.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from sklearn.datasets import make_blobs

from test_entrypoints import SMALL

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "tracking-server.sh"
NAME = "dec-team"
SEEDS = (0, 1)


def _missing() -> str | None:
    pg_dirs = [os.environ.get("DEC_PG_BIN", ""), *glob.glob("/usr/lib/postgresql/*/bin")]
    if not any(Path(d, "initdb").exists() and Path(d, "postgres").exists() for d in pg_dirs if d) and not shutil.which("initdb"):
        return "PostgreSQL server binaries (initdb, postgres) not found (Debian: apt-get install postgresql)"
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed (pip install 'dec-mlflow[server]')"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(command: str, server: dict, timeout: int) -> subprocess.CompletedProcess:
    """``deploy/tracking-server.sh command`` started, as a user would, from the server's folder."""
    return subprocess.run(["bash", str(SCRIPT), command], cwd=server["root"], env=server["env"], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server():
    """A fresh server on free ports, started from a private folder (0700, as mktemp -d makes it and as root's home
    is); the state folder is the default ./tracking-server. Always stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="dec-tracking-"))
    env = {**os.environ, "DEC_PG_PORT": str(_free_port()), "DEC_MLFLOW_PORT": str(_free_port()), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("MLFLOW_TRACKING_URI", "DEC_SERVER_DIR", "DEC_PG_DATA_ROOT"):
        env.pop(name, None)
    server = {"env": env, "root": root, "state": root / "tracking-server"}
    try:
        proc = _script("start", server, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        uri = proc.stdout.strip().removeprefix("export MLFLOW_TRACKING_URI=")
        yield {**server, "uri": uri, "start": proc}
    finally:
        stop = _script("stop", server, timeout=120)
        postgres = server["state"] / "postgres"
        if postgres.is_symlink():  # PostgreSQL's folder, placed outside the private one
            shutil.rmtree(postgres.resolve(), ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr[-3000:]


@pytest.fixture(scope="module")
def team_runs(server, tmp_path_factory):
    """Two cluster runs started together, then promote; returns their processes."""
    work = tmp_path_factory.mktemp("team")
    x, y = make_blobs(300, n_features=12, centers=3, cluster_std=1.0, random_state=0)
    np.savez(work / "blobs.npz", x=x.astype(np.float32), y=y)
    # one torch thread in each `mlflow run` process, as conftest.one_torch_thread does in this one
    env = {**server["env"], "MLFLOW_TRACKING_URI": server["uri"], "OMP_NUM_THREADS": "1"}

    def mlflow_run(entry_point: str, **params) -> subprocess.Popen:
        args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point, "--env-manager", "local"]
        for key, value in params.items():
            args += ["-P", f"{key}={value}"]
        return subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    running = [mlflow_run("cluster", dataset=work / "blobs.npz", registered_model_name=NAME, random_state=seed,
                          figure_sample_size=50, **SMALL) for seed in SEEDS]
    outputs = [p.communicate(timeout=600) for p in running]
    for p, (_, err) in zip(running, outputs):
        assert p.returncode == 0, err[-3000:]
    promote = mlflow_run("promote", model_name=NAME)
    out, err = promote.communicate(timeout=300)
    assert promote.returncode == 0, err[-3000:]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server["uri"])
    yield {"data": work / "blobs.npz", "promote_output": out}
    mlflow.set_tracking_uri(previous)


def _runs(stage: str):
    experiment = mlflow.get_experiment_by_name("Default")
    return MlflowClient().search_runs([experiment.experiment_id], f"tags.`dec.stage` = '{stage}'")


def test_script_prints_the_uri_and_the_server_answers(server):
    assert server["uri"] == f"http://127.0.0.1:{server['env']['DEC_MLFLOW_PORT']}"
    assert "first use, creating the PostgreSQL data directory" in server["start"].stderr
    with urllib.request.urlopen(f"{server['uri']}/health", timeout=10) as response:
        assert response.status == 200
    status = _script("status", server, timeout=60)
    assert "mlflow server: running" in status.stdout and "PostgreSQL: running" in status.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user PostgreSQL runs as that user, who reaches its own folders")
def test_as_root_from_a_private_folder_postgresql_gets_a_folder_its_user_can_reach(server):
    # it stopped before with "user 'postgres' cannot reach ...: make its parent folders searchable (chmod o+x)"
    assert server["root"].stat().st_mode & 0o777 == 0o700
    postgres = server["state"] / "postgres"
    assert postgres.is_symlink()
    data = postgres.resolve()
    assert data.parent == Path("/var/lib/dec-mlflow") and data.owner() == "postgres" and data.stat().st_mode & 0o777 == 0o700
    for folder in data.parents:  # root-owned and searchable up to /
        assert folder.stat().st_mode & 0o005 == 0o005 and folder.owner() == "root", folder
    assert f"so PostgreSQL's folder is {data} (linked from {postgres})" in server["start"].stderr
    assert "Permission denied" not in server["start"].stderr
    assert (data / "data" / "PG_VERSION").is_file() and (data / "postgres.log").is_file()
    status = _script("status", server, timeout=60)
    assert f"PostgreSQL: running, 127.0.0.1:{server['env']['DEC_PG_PORT']}, data {data / 'data'}" in status.stdout


def test_concurrent_cluster_runs_are_all_recorded(team_runs):
    client = MlflowClient()
    clusters = _runs("cluster")
    assert sorted(r.data.tags["seed"] for r in clusters) == ["0", "1"]
    for run in clusters:
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # served by the server, not a local path
        assert {"final_acc", "init_acc", "trust_score", "onnx_max_abs_dq", "n_iter"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "kl_loss")) >= 2
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"cluster_sizes.json", "self_training_curves.png", "network"} <= artifacts
        assert sum(mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/cluster_sizes.json")["cluster_sizes"]) == 300
    pretrains = _runs("pretrain")
    assert len(pretrains) == 2 and all(r.info.status == "FINISHED" for r in pretrains)
    assert {r.data.tags["mlflow.parentRunId"] for r in pretrains} == {r.info.run_id for r in clusters}
    for run in pretrains:
        assert len(client.get_metric_history(run.info.run_id, "pretrain_loss")) == SMALL["pretrain_epochs"]


def test_registry_holds_both_versions_and_the_champion_is_the_best(team_runs):
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {r.info.run_id for r in _runs("cluster")}
    assert all(v.status == "READY" for v in versions)
    champion = client.get_model_version_by_alias(NAME, "champion")
    best = max(versions, key=lambda v: (client.get_run(v.run_id).data.metrics["final_acc"], int(v.version)))
    assert champion.version == best.version
    assert f"{NAME}@champion -> version {best.version}" in team_runs["promote_output"]


def test_champion_loads_through_the_server_and_predicts(team_runs, server):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    x = np.load(team_runs["data"])["x"].astype(np.float64)
    out = model.predict(x)
    assert out.shape == (300, 1 + SMALL["n_clusters"]) and out["label"].between(0, SMALL["n_clusters"] - 1).all()
    run = MlflowClient().get_run(MlflowClient().get_model_version_by_alias(NAME, "champion").run_id)
    assert (out["label"].value_counts().sort_index().tolist()
            == mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/cluster_sizes.json")["cluster_sizes"])
    # the artifacts live in the server's artifact folder, the runs in PostgreSQL
    assert list((server["state"] / "artifacts").rglob("dec.onnx"))
    import psycopg

    env = server["env"]
    with psycopg.connect(host="127.0.0.1", port=int(env["DEC_PG_PORT"]), user="mlflow", dbname="mlflow",
                         passfile=str(server["state"] / "pgpass")) as conn:
        n_runs = conn.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0]
        n_versions = conn.execute("SELECT count(*) FROM model_versions WHERE name = %s", (NAME,)).fetchone()[0]
    assert n_runs >= 5 and n_versions == 2  # 2 cluster + 2 pretrain + promote


def test_stop_stops_both_and_start_reuses_the_data(server, team_runs):
    """Runs last in this module: stop, start again on the same data (no initdb), the runs still there."""
    env = server["env"]
    stop = _script("stop", server, timeout=120)
    assert stop.returncode == 0 and "mlflow server stopped" in stop.stderr and "PostgreSQL stopped" in stop.stderr
    for port in (env["DEC_PG_PORT"], env["DEC_MLFLOW_PORT"]):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(port))) != 0, f"port {port} still open after stop"
    start = _script("start", server, timeout=300)
    assert start.returncode == 0, start.stderr[-3000:]
    assert "first use" not in start.stderr and "cannot reach" not in start.stderr  # the same folder, found by its link
    mlflow.set_tracking_uri(server["uri"])
    assert len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == 2
