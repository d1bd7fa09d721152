"""Copy the paper-reproduction results of finished runs into BENCHMARKS.md.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python bench/report_experiments.py --dataset mnist

The experiments themselves are the entry points `compare`, `k_sweep` and `imbalance` (see
REPRODUCING.md); they take tens of minutes each, so this script does not rerun them: it reads the
newest FINISHED parent run of each for the dataset, prints its table and writes a section per
experiment with the run's command line, wall time and id.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from _report import machine, write_section

ARTIFACTS = {"compare": "comparison.md", "k_sweep": "k_sweep.csv", "imbalance": "imbalance.md"}


def newest(stage: str, dataset: str):
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`dec.stage` = '{stage}' and tags.dataset = '{dataset}' and attributes.status = 'FINISHED'")
    return runs[0] if runs else None


def command(run) -> str:
    skip = {"dataset_name", "data_digest", "n_samples", "n_features"}
    defaults = {}  # only the options that were given on the command line are stored as non-default params
    args = " ".join(f"--{k} {v}" for k, v in sorted(run.data.params.items()) if k not in skip and k not in defaults)
    return f"python -m dec_mlflow.cli {run.data.tags['dec.stage']} {args}"


def section(stage: str, dataset: str) -> str | None:
    run = newest(stage, dataset)
    if run is None:
        print(f"no FINISHED {stage} run for {dataset}")
        return None
    body = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=ARTIFACTS[stage])).read_text()
    if stage == "k_sweep":
        body = "```\n" + body + "```\n\nrecommended k: " + str(int(run.data.metrics["recommended_k"]))
    minutes = (run.info.end_time - run.info.start_time) / 60000
    text = (f"Run `{run.info.run_id}` ({run.info.run_name}), wall {minutes:.1f} min on {machine()}.\n"
            f"All parameters of the run (defaults included): `{json.dumps(run.data.params, sort_keys=True)}`\n\n{body}")
    print(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    args = ap.parse_args()
    client = MlflowClient()
    print(f"tracking store: {client.tracking_uri}")
    titles = {"compare": "comparison table and stability", "k_sweep": "number of clusters", "imbalance": "imbalanced subsamples"}
    for stage, title in titles.items():
        text = section(stage, args.dataset)
        if text:
            write_section(f"Paper reproduction, {args.dataset}: {title}", text)


if __name__ == "__main__":
    main()
