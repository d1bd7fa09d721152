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
import re
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from _report import machine, write_section

ARTIFACTS = {"compare": "comparison.md", "k_sweep": "k_sweep.csv", "imbalance": "imbalance.md"}


def newest(stage: str, dataset: str) -> list:
    """The newest FINISHED parent run of ``stage``; for ``compare``, the newest per set of methods."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`dec.stage` = '{stage}' and tags.dataset = '{dataset}' and attributes.status = 'FINISHED'")
    if stage != "compare":
        return runs[:1]
    seen, kept = set(), []
    for run in runs:
        if run.data.params.get("methods") not in seen:
            seen.add(run.data.params.get("methods"))
            kept.append(run)
    return kept


def section(stage: str, dataset: str) -> str | None:
    runs = newest(stage, dataset)
    if not runs:
        print(f"no FINISHED {stage} run for {dataset}")
        return None
    return "\n\n".join(_run_text(stage, run) for run in runs)


def _run_text(stage: str, run) -> str:
    body = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=ARTIFACTS[stage])).read_text()
    if stage == "k_sweep":
        body = "```\n" + body + "```\n\nrecommended k: " + str(int(run.data.metrics["recommended_k"]))
    body = re.sub(r"^(#+) ", r"##\1 ", body, flags=re.M)  # nest the artifact's headings under this section
    minutes = (run.info.end_time - run.info.start_time) / 60000
    text = (f"Run `{run.info.run_id}` ({run.info.run_name}), wall {minutes:.1f} min (the machine and its load during "
            f"the runs: REPRODUCING.md; this report written on {machine()}).\n"
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
            head = (f"Command: `MLFLOW_TRACKING_URI=<store> python bench/report_experiments.py --dataset {args.dataset}`, "
                    f"which copies the newest finished `{stage}` results; the commands that produced them are in REPRODUCING.md.")
            write_section(f"Paper reproduction, {args.dataset}: {title}", head + "\n\n" + text)


if __name__ == "__main__":
    main()
