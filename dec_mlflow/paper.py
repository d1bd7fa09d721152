"""Reference results of the DEC and IDEC papers, as plain data.

Sources
-------
* DEC: Junyuan Xie, Ross Girshick, Ali Farhadi, "Unsupervised Deep Embedding for Clustering
  Analysis", ICML 2016, arXiv:1511.06335 (https://ar5iv.labs.arxiv.org/html/1511.06335).
* IDEC: Xifeng Guo, Long Gao, Xinwang Liu, Jianping Yin, "Improved Deep Embedded Clustering with
  Local Structure Preservation", IJCAI 2017
  (copy: https://m.moam.info/improved-deep-embedded-clustering-with-local_5c1a635d097c4781438b45e5.html).

What could be read, and what could not
--------------------------------------
The stored copies of both pages return only their opening (title, abstract, start of the
introduction); none of the result tables of either paper could be read there. The body text of the
DEC paper (sections, figure references, protocol) was read in full from a stored plain-text
conversion of the paper, but that conversion drops the tables. So:

* ``TABLE2_ACCURACY``, ``TABLE3_ACCURACY``, ``TABLE4_IMBALANCED`` and ``IDEC_MNIST`` are left EMPTY
  on purpose: no number in them could be checked against the paper. Fill them only from the paper.
* What the paper's text says about each table (rows, columns, N/A cells) is kept next to it.
* ``FIGURES``, ``NUMBER_OF_CLUSTERS`` and ``IMBALANCED_PROTOCOL`` come from the DEC body text.
* ``SECONDARY_REPORTED`` holds a few numbers that third-party READMEs attribute to the papers. They
  are NOT transcribed from the papers and are kept apart so that they are never mistaken for it.

Conventions: accuracies are fractions (0.843, not 84.30); ``None`` marks a cell the paper reports as
N/A (or a dash); a missing key means "not transcribed". Method names follow the paper ("k-means",
"LDMGI", "SEC", "AE+k-means", "DEC w/o backprop", "DEC"); the paper's text spells LDMGI both
"LDMGI" and "LDGMI", the key here is "LDMGI".
"""

from __future__ import annotations

DEC_ARXIV_ID = "1511.06335"
DEC_URL = "https://ar5iv.labs.arxiv.org/html/1511.06335"
IDEC_URL = (
    "https://m.moam.info/improved-deep-embedded-clustering-with-local_5c1a635d097c4781438b45e5.html"
)

# Column order of DEC Tables 2 and 3, as named in the task brief. The paper's text names the data
# sets MNIST, STL-10 (HOG features concatenated with an 8x8 color map), REUTERS (685071 articles,
# 4 root categories, tf-idf on 2000 word stems) and REUTERS-10k (random 10000-article subset).
DATASETS = ("MNIST", "STL-HOG", "REUTERS-10K", "REUTERS")

# ---------------------------------------------------------------------------------------------
# DEC Table 2. Caption: NOT READABLE in the stored page.
# What the text says about it: best accuracy (ACC, paper eq. 10) over 9 hyperparameter settings
# of each algorithm: k-means, LDMGI, SEC, DEC, plus the ablation "DEC w/o backprop" (f_theta
# frozen during clustering), which the text says is reported in Table 2 as well (the task brief
# placed it in Table 3). LDMGI and SEC could not be run on full REUTERS and are reported N/A.
# Values: not transcribed (table not readable); left empty rather than guessed.
TABLE2_METHODS = ("k-means", "LDMGI", "SEC", "DEC w/o backprop", "DEC")
TABLE2_NOT_AVAILABLE = (("REUTERS", "LDMGI"), ("REUTERS", "SEC"))
TABLE2_ACCURACY: dict[str, dict[str, float | None]] = {}

# ---------------------------------------------------------------------------------------------
# DEC Table 3. Caption: NOT READABLE in the stored page.
# What the text says about it: performance of all algorithms on autoencoder features; SEC and
# LDMGI change little with AE features, k-means improves but stays below DEC. The row set below
# is inferred from that sentence and the task brief, not read from the table.
# Values: not transcribed (table not readable); left empty rather than guessed.
TABLE3_METHODS = ("AE+k-means", "AE+LDMGI", "AE+SEC", "DEC")
TABLE3_ACCURACY: dict[str, dict[str, float | None]] = {}

# ---------------------------------------------------------------------------------------------
# DEC Table 4. Caption: NOT READABLE in the stored page.
# What the text says about it: accuracy on imbalanced subsamples of MNIST for several minimum
# retention rates r_min (protocol in IMBALANCED_PROTOCOL); DEC is fairly robust to cluster-size
# variation and the KL phase consistently improves on its AE+k-means initialization.
# The r_min values and the k-means row are as given in the task brief; the text read does not
# list them. Values: not transcribed (table not readable); left empty rather than guessed.
TABLE4_RETENTION_RATES = (0.1, 0.3, 0.5, 0.7, 0.9)
TABLE4_METHODS = ("k-means", "AE+k-means", "DEC")
TABLE4_IMBALANCED: dict[str, dict[float, float]] = {}

IMBALANCED_PROTOCOL = (
    "Subsample MNIST with minimum retention rate r_min: class 0 is kept with probability r_min, "
    "class 9 with probability 1, classes in between with linearly interpolated probability, so "
    "the largest cluster is 1/r_min times the size of the smallest."
)

# ---------------------------------------------------------------------------------------------
# IDEC paper, MNIST rows (ACC and NMI as fractions) for k-means, AE+k-means, DEC, IDEC.
# Values: not transcribed -- the stored copy of the IDEC paper yields only its opening, the
# result table is not readable there. Left empty rather than guessed.
IDEC_METHODS = ("k-means", "AE+k-means", "DEC", "IDEC")
IDEC_MNIST: dict[str, dict[str, float]] = {}

# ---------------------------------------------------------------------------------------------
# DEC, section "Number of Clusters" (Fig. 6). The section number could not be confirmed.
NUMBER_OF_CLUSTERS_K_MNIST = 9
NUMBER_OF_CLUSTERS = (
    "On MNIST, generalizability G (ratio of training to validation loss) drops sharply when the "
    "number of clusters goes from 9 to 10, so DEC selects k=9; NMI is also highest at k=9, "
    "because the similarly written digits 4 and 9 are merged into one cluster by DEC "
    "(matching the 4/9 confusion visible in Fig. 3)."
)

# DEC figures, numbered as the paper's text refers to them (Fig. 1 to Fig. 6). Note that t-SNE
# over epochs is Fig. 5, the gradient plot is Fig. 4 and the choice of k is Fig. 6 -- not 2/3/5.
FIGURES = {
    1: "Network structure: the SAE encoder layers kept as the initial mapping f_theta to the "
    "feature space Z",
    2: "Clustering accuracy of each method under all 9 hyperparameter settings",
    3: "Top 10 scoring images of each cluster on MNIST and STL, sorted by distance to the "
    "cluster center (MNIST: 4 and 9 confused)",
    4: "Gradient magnitude |dL/dz_i| against soft assignment q_ij for one random MNIST cluster, "
    "with images at each 10th percentile of q_ij",
    5: "t-SNE of the embedded points of an MNIST subset as training progresses; panel (f): "
    "accuracy over SGD epochs",
    6: "Choosing the number of clusters on MNIST: NMI and generalizability G against k",
}

# ---------------------------------------------------------------------------------------------
# NOT FROM THE PAPERS. Numbers that third-party texts in the stored code index attribute to the
# papers; read there, never checked against the papers' tables. Fraction values.
# "read_in" says where; "note" says what makes each one doubtful.
SECONDARY_REPORTED = (
    {"paper": "DEC", "dataset": "MNIST", "method": "DEC", "metric": "ACC", "value": 0.8430,
     "read_in": "README of a third-party DEC reproduction; also a Chinese reproduction guide",
     "note": "two independent texts agree"},
    {"paper": "DEC", "dataset": "MNIST", "method": "AE+k-means", "metric": "ACC",
     "value": 0.8184,
     "read_in": "README of a third-party DEC reproduction; also a Chinese reproduction guide",
     "note": "two independent texts agree; table (2 or 3) not stated"},
    {"paper": "DEC", "dataset": "MNIST", "method": "DEC w/o backprop", "metric": "ACC",
     "value": 0.7982, "read_in": "README of a third-party DEC reproduction",
     "note": "single source"},
    {"paper": "DEC", "dataset": "MNIST", "method": "k-means", "metric": "ACC", "value": 0.5349,
     "read_in": "Chinese reproduction guide",
     "note": "single source, which mixes DEC- and IDEC-paper numbers"},
    {"paper": "DEC", "dataset": "STL-HOG", "method": "DEC", "metric": "ACC", "value": 0.3590,
     "read_in": "Chinese reproduction guide", "note": "single source"},
    {"paper": "DEC", "dataset": "REUTERS-10K", "method": "DEC", "metric": "ACC",
     "value": 0.7217, "read_in": "Chinese reproduction guide", "note": "single source"},
    {"paper": "IDEC", "dataset": "MNIST", "method": "IDEC", "metric": "ACC", "value": 0.8806,
     "read_in": "Chinese reproduction guide", "note": "single source"},
    {"paper": "IDEC", "dataset": "MNIST", "method": "IDEC", "metric": "NMI", "value": 0.8672,
     "read_in": "Chinese reproduction guide", "note": "single source"},
)
