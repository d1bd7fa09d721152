"""Reference numbers of the DEC and IDEC papers that the experiment reports print beside ours.

Sources, and how sure each number is:

* DEC: Xie, Girshick, Farhadi, "Unsupervised Deep Embedding for Clustering Analysis", ICML 2016
  (arXiv:1511.06335). MNIST accuracies of k-means (Table 2), AE+k-means (Table 3) and DEC are the
  ones this project's brief quotes from the paper (53.5, 81.8, 84.3 %); two independent
  third-party write-ups give the same values to two decimals (53.49, 81.84, 84.30).
* "DEC w/o backprop" (79.82 %) is read in one third-party reproduction README, not in the paper.
* IDEC: Guo, Gao, Liu, Yin, IJCAI 2017. MNIST accuracies as the IDEC author lists them in the
  README of XifengGuo/IDEC-toy ("AE+KMeans(paper) 81.8, DEC(paper) 86.6, IDEC(paper) 88.1"): the
  IDEC paper's own DEC re-run, not the DEC paper's.
* The paper's Table 4 (imbalanced MNIST) could not be read from any stored copy here, so no
  Table 4 number is given: reports print "n/t" (not transcribed) instead of guessing.

Accuracies are fractions. A missing key means "no number we could check".
"""

from __future__ import annotations

DEC_MNIST_ACC = {"k-means": 0.535, "AE+k-means": 0.818, "DEC w/o backprop": 0.798, "DEC": 0.843}
IDEC_MNIST_ACC = {"AE+k-means": 0.818, "DEC": 0.866, "IDEC": 0.881}
TABLE4_RETENTION_RATES = (0.1, 0.3, 0.5, 0.7, 0.9)
TABLE4_IMBALANCED_ACC: dict[str, dict[float, float]] = {}  # not transcribed, see the module docstring

# Section "Number of Clusters" (Figure 6): what the paper finds on MNIST.
K_MNIST = 9
NUMBER_OF_CLUSTERS = (
    "On MNIST, generalizability G = L_train / L_validation drops sharply from k=9 to k=10 and NMI "
    "peaks at k=9: DEC merges the similarly written 4 and 9."
)
# The paper's figures, by number (from its text).
FIGURES = {
    2: "accuracy of each method under 9 hyperparameter settings",
    3: "top 10 images of each cluster on MNIST and STL",
    4: "gradient magnitude |dL/dz_i| against soft assignment q_ij for one MNIST cluster",
    5: "t-SNE of embedded MNIST points as self-training progresses; (f) accuracy over epochs",
    6: "NMI and generalizability G against the number of clusters on MNIST",
}


def accuracy(dataset: str, method: str, source: str = "dec") -> float | None:
    """The ``source`` paper's ('dec' or 'idec') accuracy of ``method`` on ``dataset``, or None."""
    if dataset.lower() != "mnist":
        return None
    return (DEC_MNIST_ACC if source == "dec" else IDEC_MNIST_ACC).get(method)


def imbalanced_accuracy(method: str, r_min: float) -> float | None:
    """The paper's Table 4 accuracy of ``method`` at ``r_min``, or None (not transcribed)."""
    return TABLE4_IMBALANCED_ACC.get(method, {}).get(r_min)
