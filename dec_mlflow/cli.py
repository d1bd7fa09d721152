"""Entry points: a command per ``MLproject`` entry point, each calling one lifecycle stage.

This module only parses options and prints what a stage returns; the stages are in
:mod:`dec_mlflow.lifecycle` and :mod:`dec_mlflow.lifecycle_experiments`. Option names are the
stages' keyword arguments (the estimator's for hyperparameters) and their defaults come from the
stage signatures and the estimator, so ``MLproject`` mirrors them one to one (a test checks every
entry point). Values are checked before any work starts; a user-caused failure prints one line
``Error: ...`` and exits with status 1 (or 2 for an option click itself rejects), so ``mlflow run``
marks the run FAILED, and a run the stage started ends FAILED too.
"""

from __future__ import annotations

import functools
import inspect
import signal

import click

from dec_mlflow import distributed, lifecycle, lifecycle_experiments, params
from dec_mlflow.environment import Stopped, stop_signals
from dec_mlflow.estimator import TRUST_SCORE
from dec_mlflow.presets import DESCRIPTIONS, PRESETS


class _NumberOrAuto(click.ParamType):
    """A number of ``kind`` (int or float), or 'auto' for the estimator (or the preset) to choose from the data."""

    def __init__(self, kind: type):
        self.kind = kind
        self.name = f"{'integer' if kind is int else 'float'}|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, self.kind):
            return value
        try:
            return self.kind(value)
        except ValueError:
            self.fail(f"must be {'an integer' if self.kind is int else 'a number'} or 'auto'; got {value!r}", param, ctx)


INT_OR_AUTO = _NumberOrAuto(int)
FLOAT_OR_AUTO = _NumberOrAuto(float)



def _click_type(param: params.Param):
    """The option type of an estimator parameter: from its rule, with 'auto' where the stage's default is 'auto'
    (left to the preset); widths, image shape and device are text the stage parses."""
    rule, stage_auto = param.rule, lifecycle.ESTIMATOR_DEFAULTS[param.name] == "auto"
    if isinstance(rule, params.Integer):
        return INT_OR_AUTO if rule.auto or stage_auto else click.INT
    if isinstance(rule, params.Number):
        return FLOAT_OR_AUTO if rule.auto or stage_auto else click.FLOAT
    if isinstance(rule, params.OneOf):
        return click.Choice(("auto", *rule.choices) if stage_auto and "auto" not in rule.choices else rule.choices)
    if isinstance(rule, params.Augment):
        return click.Choice(("auto", "true", "false", *params.AUGMENT_MODES), case_sensitive=False)
    if isinstance(rule, params.Seed):
        return click.INT  # the stages name and reuse runs by the seed
    return str


# name -> (click type, help) for each estimator parameter, from the table dec_mlflow.params.PARAMS;
# defaults are the stages' (lifecycle.ESTIMATOR_DEFAULTS).
ESTIMATOR_OPTIONS = {p.name: (_click_type(p), p.help) for p in params.PARAMS}
_LIST_ITEMS = {int: "integers", float: "numbers", str: "names"}


def _parse_list(item_type):
    """Click callback: 'a,b,c' -> a tuple of ``item_type``, or a BadParameter naming the option."""
    def parse(ctx, param, value):
        try:
            return tuple(item_type(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"must be comma-separated {_LIST_ITEMS[item_type]}; got {value!r}") from None
    return parse


def _option(name: str, default, help_: str, type_=None):
    """``--name`` with ``default`` (a tuple default is written comma-separated and parsed back)."""
    if default is inspect.Parameter.empty:
        return click.option(f"--{name}", required=True, type=type_, help=help_)
    callback = None
    if isinstance(default, tuple):
        callback = _parse_list(type(default[0]))
        default = ",".join(map(str, default))
    return click.option(f"--{name}", type=type_, default=default, show_default=default != "", callback=callback, help=help_)


def _stage_options(stage, options: dict[str, object]):
    """Options for ``stage``'s own keyword arguments, name -> help or (click type, help); defaults from its signature."""
    signature = inspect.signature(stage).parameters

    def decorate(fn):
        for name, spec in reversed(options.items()):
            type_, help_ = spec if isinstance(spec, tuple) else (None, spec)
            fn = _option(name, signature[name].default, help_, type_)(fn)
        return fn
    return decorate


def _estimator_options(names):
    """Options for the estimator parameters ``names``, with the estimator's defaults."""
    def decorate(fn):
        for name in reversed(names):
            type_, help_ = ESTIMATOR_OPTIONS[name]
            fn = _option(name, lifecycle.ESTIMATOR_DEFAULTS[name], help_, type_)(fn)
        return fn
    return decorate


_DATA_HELP = {
    "dataset": "'mnist', 'reuters', 'reuters10k', 'stl10', scikit-learn's 'digits', 'wine', 'breast_cancer', 'iris', or a path to a .npy/.npz/.csv/.parquet file.",
    "label_column": "Label column of a .csv/.parquet file (or key of a .npz); labels are only used for metrics.",
}
_EXPERIMENT_HELP = {"experiment": "MLflow experiment to log to (created if missing); default: MLFLOW_EXPERIMENT_NAME, else Default."}
_REGISTRY_HELP = {"registered_model_name": "Registry name; default dec-<dataset>. 'none' skips registration."}
_NPROC_HELP = {"nproc": (click.INT, "Training processes on this machine, run by torchrun (gloo on the CPU, NCCL on GPUs); "
                         "1 trains in this process. Under your own torchrun (several machines) leave it at 1.")}
_PRESET_HELP = {"preset": (click.Choice(PRESETS), "Named recipe for the options left at 'auto': "
                           + "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items()) + ".")}


def _user_errors(fn):
    """Turn user-caused errors into one line ``Error: ...`` and exit status 1 (the MLflow run is then FAILED).

    Ctrl-C and SIGTERM end the command with one line too, exit status 128 + the signal number (130,
    143), and the stage's MLflow runs KILLED (``tracking.stage_run``), so that the same command started
    again finds them stopped and resumes.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with stop_signals():
                return fn(*args, **kwargs)
        # ValueError: parameters and data (DataError), each naming what is wrong;
        # FloatingPointError: training diverged, the message names the learning rate to lower;
        # WorkerFailed: a torchrun rank failed, its own error is printed above
        except (ValueError, FloatingPointError, distributed.WorkerFailed) as e:
            raise click.ClickException(" ".join(line.strip() for line in str(e).splitlines() if line.strip())) from e
        except KeyboardInterrupt as e:  # Stopped (SIGTERM, SIGINT), or a KeyboardInterrupt raised outside stop_signals
            signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
            click.echo(f"\nError: stopped by {signal.Signals(signum).name}; the runs in progress were ended KILLED "
                       "(the same command started again resumes pretraining from its last checkpoint)", err=True)
            raise click.exceptions.Exit(128 + signum) from None
    return wrapper


def _echo_model(result: dict) -> None:
    message = (f"Logged model {result['model_uri']} (ONNX max |dq| {result['onnx_max_abs_dq']:.1e}, "
               f"labels identical but for {result['onnx_near_ties']} near-ties not compared)")
    if result["registered_model_version"] is not None:
        message += f", registered as {result['registered_model_name']} version {result['registered_model_version']}"
    click.echo(message)


def _scores(metrics: dict, prefix: str) -> str:
    return lifecycle.fmt_scores({k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)})


@click.group()
def main():
    """Deep Embedded Clustering with MLflow tracking and ONNX serving."""


@main.command()
@_stage_options(lifecycle.pretrain, {**_DATA_HELP, **_PRESET_HELP, **_EXPERIMENT_HELP, **_NPROC_HELP})
@_estimator_options(lifecycle.PRETRAIN_STAGE_PARAMS)
@_user_errors
def pretrain(**options):
    """Pretrain the autoencoder. Reads DATASET; writes the run artifact autoencoder/autoencoder.pt."""
    lifecycle.pretrain(**options)


@main.command()
@_stage_options(lifecycle.cluster, {
    **_DATA_HELP,
    "autoencoder": "Pretrained autoencoder: a run id, runs:/ or models:/ URI, or a .pt file. Default: reuse a matching FINISHED pretrain run, else pretrain now.",
    **_REGISTRY_HELP,
    "figure_sample_size": (click.INT, "Points recorded for the self-training figures (t-SNE snapshots, gradient vs q); >= 10."),
    **_PRESET_HELP,
    **_EXPERIMENT_HELP,
    **_NPROC_HELP,
})
@_estimator_options(lifecycle.ESTIMATOR_PARAMS)
@_user_errors
def cluster(**options):
    """The main job: pretrain or reuse an autoencoder, initial clusters, DEC self-training, log and register.

    Reads DATASET; writes run artifacts network/dec_network.pt, cluster_sizes.json and the ONNX
    pyfunc model ``model``, registered as dec-<dataset>; a child run if it had to pretrain.
    """
    result = lifecycle.cluster(**options)
    if "model_uri" not in result:  # a rank > 0, or the launcher of the ranks: rank 0 printed the results
        return
    metrics = result["metrics"]
    if result["k_choice"]:
        click.echo(result["k_choice"])
    click.echo(f"Trust score {metrics['trust_score']:.4f} ({TRUST_SCORE}; label-free, higher is better)")
    if "final_acc" in metrics:
        click.echo("Initial " + _scores(metrics, "init_") + "\nDEC     " + _scores(metrics, "final_"))
    _echo_model(result)


@main.command()
@_stage_options(lifecycle.evaluate, {
    "model": "A models:/ URI, runs:/<id>/model, or a cluster run id.",
    **_DATA_HELP,
    "sample_size": (click.INT, "Points in the t-SNE embedding plot; >= 10."),
    "random_state": (click.INT, "Seed of the plot subsample and t-SNE."),
    **_EXPERIMENT_HELP,
})
@_user_errors
def evaluate(**options):
    """Score a model on a labelled dataset: ACC/NMI/ARI, confusion matrix, sizes, embedding, top images."""
    click.echo(lifecycle.fmt_scores(lifecycle.evaluate(**options)["metrics"]))


@main.command()
@_stage_options(lifecycle.export, {
    "run_id": "A FINISHED cluster run whose network/dec_network.pt to export.",
    **_DATA_HELP, **_REGISTRY_HELP, **_EXPERIMENT_HELP,
})
@_user_errors
def export(**options):
    """Re-export a cluster run's network to ONNX, verify it on DATASET, log and register it as a new run."""
    _echo_model(lifecycle.export(**options))


@main.command()
@_stage_options(lifecycle.promote, {
    "model_name": "Registered model name, e.g. dec-mnist.",
    "metric": "Metric of each version's source run to rank by; 'auto' = final_acc when every run had labels, else the label-free trust_score.",
    "mode": (click.Choice(["max", "min"]), "Whether larger metric values are better."),
    "alias": "Alias to point at the best version.",
})
@_user_errors
def promote(model_name, metric, mode, alias):
    """Point ALIAS (default champion) at the registered version with the best METRIC."""
    result = lifecycle.promote(model_name, metric=metric, mode=mode, alias=alias)
    before = f"(was version {result['previous']})" if result["previous"] else "(no previous holder)"
    click.echo(f"{model_name}@{alias} -> version {result['version']}, {result['metric']}={result['value']:.4f} {before}")


@main.command()
@_stage_options(lifecycle.score, {
    "model": "Model to score with: models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model.",
    "input": "A .parquet or .csv table (numeric feature columns, optionally the id column) or a 2-D .npy array of raw features.",
    "output": "Parquet to write (a file with engine local, a directory of part files with spark); must not exist.",
    "engine": (click.Choice(("local", "spark")), "'local': this process, in chunks; 'spark': mlflow.pyfunc.spark_udf on a Spark session."),
    "id_column": "Input column carried to the output as the row key; without it the key is 'row', the row's position.",
    "chunk_size": (click.INT, "Rows per model call (capped at the model's max_batch_rows); Spark's Arrow batch size."),
    "spark_master": "Spark master URL (engine spark); default $SPARK_MASTER, else local[*].",
    **_EXPERIMENT_HELP,
})
@_user_errors
def score(**options):
    """Batch scoring: write the label and q_0..q_{k-1} of every INPUT row to OUTPUT, keyed by id or row."""
    r = lifecycle.score(**options)
    master = f", {r['spark_master']}" if r["spark_master"] else ""
    click.echo(f"Scored {r['n_rows']} rows in {r['seconds']:.1f} s ({r['rows_per_s']:,.0f} rows/s, "
               f"engine {r['engine']}{master}) -> {r['output']}")


@main.command()
@_stage_options(lifecycle_experiments.compare, {
    **_DATA_HELP,
    "seeds": "Comma-separated seeds; each pretrains (or reuses) its own autoencoder.",
    "methods": "Comma-separated subset of the methods.",
    "select_from": (click.INT, "Candidates per choice in the stability report: the spread of DEC when the autoencoder is picked among this many seeds by each label-free criterion."),
    "idec_lr": (click.FLOAT, "IDEC's SGD learning rate (IDEC paper: 0.1)."),
    "idec_momentum": (click.FLOAT, "IDEC's SGD momentum (IDEC paper: 0.99)."),
    **_PRESET_HELP,
    **_EXPERIMENT_HELP,
})
@_estimator_options(lifecycle_experiments.COMPARE_PARAMS)
@_user_errors
def compare(**options):
    """The paper's comparison table: k-means, AE+k-means, DEC w/o backprop, DEC and IDEC over seeds.

    Reads DATASET; one child run per method and seed (plus a pretrain run per seed unless a
    matching one exists); the parent writes comparison.md, comparison_table.json/.csv (mean and
    std per method), comparison_runs.json/.csv (every method and seed) and stability.json.
    """
    markdown = lifecycle_experiments.compare(**options)["markdown"]
    if markdown:
        click.echo(markdown)


@main.command(name="k_sweep")
@_stage_options(lifecycle_experiments.k_sweep, {
    **_DATA_HELP,
    "ks": "Comma-separated numbers of clusters to try.",
    "validation_fraction": (click.FLOAT, "Share of the data held out to measure KL_validation."),
    "autoencoder": "Pretrained autoencoder (run id, URI or .pt); default: pretrain on the training split (or reuse a matching run).",
    **_PRESET_HELP,
    **_EXPERIMENT_HELP,
})
@_estimator_options(lifecycle_experiments.K_SWEEP_PARAMS)
@_user_errors
def k_sweep(**options):
    """Choose k by n_clusters=auto's criterion, next to the paper's generalizability G = KL_train / KL_validation.

    Splits DATASET into training and validation parts, pretrains once on the training part, fits
    DEC for every k (a child run each) and logs per k: KL on both parts, G, the valley depth of the
    k-th cut of the UMAP map (map_valley_depth) and, with labels, NMI and ACC on the validation part;
    the parent logs the curves (step = k), k_sweep.png, the table k_sweep.json/.csv, recommended_k
    (n_clusters=auto's choice in min(KS)..max(KS)) and recommended_k_generalizability (the k before
    G's largest drop).
    """
    result = lifecycle_experiments.k_sweep(**options)
    by_g = lifecycle_experiments.recommended_by_generalizability(result["table"])
    click.echo(f"Recommended k = {result['recommended_k']} (n_clusters=auto's cuts of the map; "
               f"the paper's G, the k before its largest drop, says {by_g})")


@main.command()
@_stage_options(lifecycle_experiments.imbalance, {
    **_DATA_HELP,
    "r_mins": "Comma-separated retention rates of the first class (the last keeps 1).",
    "autoencoder": "Pretrained autoencoder for every subsample (run id, URI or .pt); default: pretrain on each subsample (or reuse a matching run).",
    **_PRESET_HELP,
    **_EXPERIMENT_HELP,
})
@_estimator_options(lifecycle_experiments.IMBALANCE_PARAMS)
@_user_errors
def imbalance(**options):
    """The paper's Table 4: k-means, AE+k-means and DEC on subsamples with skewed class sizes.

    For each r_min, class c of DATASET keeps a share r_min + (1 - r_min) c / (C - 1) of its
    samples (seeded by random_state); a child run per r_min logs each method's ACC/NMI/ARI and
    the class sizes; the parent logs the curves (step = round(100 r_min)), imbalance.png and
    imbalance.json/.csv/.md with the paper's Table 4 next to ours.
    """
    click.echo(lifecycle_experiments.imbalance(**options)["markdown"])


if __name__ == "__main__":
    main()
