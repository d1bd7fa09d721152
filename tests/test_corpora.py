"""The paper's corpora: REUTERS and STL-10 formats, their preprocessing, checksums trusted on first
use, downloads from file:// mirrors and the features cache. All files are small synthetic ones in
the real formats; nothing is downloaded from the network."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

from dec_mlflow import corpora, data
from dec_mlflow.data import KNOWN_DATASETS, DataError, load_dataset

HEX64 = r"[0-9a-f]{64}"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty user cache, $DEC_DATA_DIR unset and no mirror to download from."""
    monkeypatch.delenv("DEC_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data, "REUTERS_MIRRORS", ())
    monkeypatch.setattr(data, "STL10_MIRRORS", ())
    return tmp_path / "xdg" / "dec_mlflow"


def _write_gz(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode("ascii"), mtime=0))
    return path


def _token_text(docs: dict[int, str]) -> str:
    """A LYRL2004 token file holding ``docs`` (docid -> token lines)."""
    return "".join(f".I {doc}\n.W\n{text}\n" for doc, text in docs.items())


def _write_reuters(folder: Path, files: dict[str, dict[int, str]], qrels: str) -> None:
    """The six RCV1-v2 files in ``folder``; token files absent from ``files`` hold no documents."""
    for name in corpora.REUTERS_TOKEN_FILES:
        _write_gz(folder / name, _token_text(files.get(name, {})))
    _write_gz(folder / corpora.REUTERS_QRELS, qrels)


PT0, PT1, PT3, TRAIN = (corpora.REUTERS_TOKEN_FILES[i] for i in (0, 1, 3, 4))
SMALL_CORPUS = {
    PT0: {1: "oil price rise\noil", 2: "vote elect"},
    PT1: {3: "match goal"},
    PT3: {4: "price stock stock"},
    TRAIN: {5: "rate bank", 6: "elect vote vote"},
}
# 1: CCAT and a sub-category; 2: two roots; 3: no root; 4: MCAT; 5: ECAT; 6: GCAT, listed twice
SMALL_QRELS = ("C15 1 1\nCCAT 1 1\nCCAT 2 1\nGCAT 2 1\nGSPO 3 1\nM11 4 1\nMCAT 4 1\n"
               "ECAT 5 1\nGCAT 6 1\nGCAT 6 1\n")


@pytest.fixture
def reuters_dir(tmp_path, cache, monkeypatch) -> Path:
    """$DEC_DATA_DIR/reuters holding the small synthetic corpus."""
    monkeypatch.setenv("DEC_DATA_DIR", str(tmp_path / "data"))
    folder = tmp_path / "data" / "reuters"
    _write_reuters(folder, SMALL_CORPUS, SMALL_QRELS)
    return folder


def test_known_datasets_include_the_papers_corpora():
    assert KNOWN_DATASETS == ("mnist", "reuters", "reuters10k", "stl10", "digits", "wine", "breast_cancer", "iris")


# --- REUTERS: formats ---------------------------------------------------------------------------


def test_qrels_keep_only_documents_with_exactly_one_root_category(tmp_path):
    path = _write_gz(tmp_path / "q.gz", SMALL_QRELS)
    # non-root categories (C15, M11, GSPO) are ignored; a repeated line is still one category
    assert corpora.read_single_label(path) == {1: 0, 4: 2, 5: 3, 6: 1}  # CCAT 0, GCAT 1, MCAT 2, ECAT 3


def test_token_file_documents_come_in_file_order_with_their_lines_joined(tmp_path):
    path = _write_gz(tmp_path / "t.gz", ".I 7\n.W\nalpha beta\ngamma\n.I 3\n.W\n.I 12\n.W\ndelta\n")
    docs = list(corpora.read_documents(path))
    assert [doc for doc, _ in docs] == [7, 3, 12]
    assert docs[0][1].split() == ["alpha", "beta", "gamma"] and docs[1][1] == "" and docs[2][1].split() == ["delta"]


def _all_documents(path: Path) -> list[tuple[int, str]]:
    return list(corpora.read_documents(path))


@pytest.mark.parametrize(
    ("read", "text", "message"),
    [
        (_all_documents, ".I 1\n.W\nok\n.I x7\n", r"t\.gz: line 4 should read '\.I <docid>', got '\.I x7'"),
        (_all_documents, "stray words\n.I 1\n", r"t\.gz: line 1 holds text before the first '\.I <docid>' line"),
        (corpora.read_single_label, "CCAT 1 1\nCCAT\n", r"t\.gz: line 2 should read '<category> <docid> 1', got 'CCAT'"),
    ],
)
def test_malformed_lines_name_the_file_line_and_value(tmp_path, read, text, message):
    path = _write_gz(tmp_path / "t.gz", text)
    with pytest.raises(ValueError, match=message):
        read(path)


def test_not_a_gzip_file_is_named(tmp_path):
    path = tmp_path / "t.gz"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match=r"t\.gz: not a readable gzip file"):
        corpora.read_single_label(path)


# --- REUTERS: preprocessing ---------------------------------------------------------------------


def test_top_words_rank_by_total_count_ties_alphabetical_columns_alphabetical():
    # totals: zeta 4 (one text), yak 3 (three texts), cat 2, bee 2, ox 1; 'a' has one letter: no token
    texts = ["zeta zeta zeta zeta a a a a a", "yak cat", "yak bee", "yak cat bee ox"]
    counts, vocabulary = corpora.term_counts(texts, n_words=3)
    assert vocabulary == ["bee", "yak", "zeta"]  # bee beats cat on the tie; ox is out
    np.testing.assert_array_equal(counts.toarray(), [[0, 0, 4], [0, 1, 0], [1, 1, 0], [1, 1, 0]])
    _, everything = corpora.term_counts(texts, n_words=2000)
    assert everything == ["bee", "cat", "ox", "yak", "zeta"]  # fewer words than n_words: all kept


def test_tfidf_of_three_documents_matches_the_hand_computation():
    counts, vocabulary = corpora.term_counts(["apple apple banana", "banana cherry", "apple"], n_words=2000)
    assert vocabulary == ["apple", "banana", "cherry"]
    x = corpora.tfidf(counts).toarray()
    # n=3 documents; df: apple 2, banana 2, cherry 1; idf = ln((1+n)/(1+df)) + 1; tf = 1 + ln(count)
    idf_ab, idf_c = math.log(4 / 3) + 1, math.log(4 / 2) + 1
    rows = [[(1 + math.log(2)) * idf_ab, idf_ab, 0.0], [0.0, idf_ab, idf_c], [idf_ab, 0.0, 0.0]]
    expected = [[v / math.sqrt(sum(w * w for w in row)) * math.sqrt(3) for v in row] for row in rows]
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    np.testing.assert_allclose(x[2], [math.sqrt(3), 0, 0], rtol=1e-6)  # one word: all the row's weight


def test_tfidf_equals_the_authors_scikit_learn_pipeline():
    texts = ["oil price oil rise", "vote elect vote", "price stock", "goal match goal goal", "rate bank oil", ""]
    counts, _ = corpora.term_counts(texts, n_words=4)
    authors = CountVectorizer(max_features=4).fit_transform(texts)  # no ties at the cut here
    authors = TfidfTransformer(norm="l2", sublinear_tf=True).fit_transform(authors).toarray() * np.sqrt(4)
    np.testing.assert_allclose(corpora.tfidf(counts).toarray(), authors, rtol=1e-6)


def test_reuters_keeps_single_label_documents_in_file_order(reuters_dir):
    ds = load_dataset("REUTERS")
    assert ds.name == "reuters" and ds.image_shape is None and ds.default_scaling == "max"
    np.testing.assert_array_equal(ds.y, [0, 2, 3, 1])  # documents 1, 4, 5, 6
    # the vocabulary of the kept documents only: bank elect oil price rate rise stock vote
    assert sparse.isspmatrix_csr(ds.x) and ds.x.shape == (4, 8) and ds.x.dtype == np.float32  # stays sparse
    np.testing.assert_allclose(np.linalg.norm(ds.x.toarray(), axis=1), np.sqrt(8), rtol=1e-6)
    assert ds.x[0, 2] > ds.x[0, 3] > 0  # document 1: 'oil' twice, 'price' once


def test_reuters10k_is_a_fixed_random_sample_of_10000_documents(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("DEC_DATA_DIR", str(tmp_path / "data"))
    n_docs = 10_050
    docs = {i: f"w{i % 13} v{i % 7} common" for i in range(1, n_docs + 1)}
    qrels = "".join(f"{corpora.ROOT_CATEGORIES[i % 4]} {i} 1\n" for i in docs)
    _write_reuters(tmp_path / "data" / "reuters", {TRAIN: docs}, qrels)
    full = load_dataset("reuters")
    sample = load_dataset("reuters10k", n_clusters=4)
    assert sample.name == "reuters10k" and sample.x.shape == (10_000, full.x.shape[1])
    rows = np.random.RandomState(1234).permutation(n_docs)[:10_000]  # the authors' draw
    np.testing.assert_array_equal(sample.x.toarray(), full.x[rows].toarray())
    np.testing.assert_array_equal(sample.y, full.y[rows])
    np.testing.assert_array_equal(load_dataset("reuters10k").y, sample.y)  # the same sample every time


def test_reuters10k_of_a_corpus_under_10000_documents_is_refused(reuters_dir):
    with pytest.raises(DataError, match=r"dataset 'reuters10k': the corpus has 4 single-label documents, "
                                        r"fewer than the n=10000 to sample"):
        load_dataset("reuters10k")


def test_format_errors_name_the_dataset_and_file(reuters_dir):
    _write_gz(reuters_dir / TRAIN, ".I 5\n.W\nrate\n.I five\n")
    with pytest.raises(DataError, match=rf"dataset 'reuters': {reuters_dir / TRAIN}: line 4 should read"):
        load_dataset("reuters")


# --- checksums trusted on first use ---------------------------------------------------------------


def test_unpinned_checksums_are_recorded_on_first_use(reuters_dir, cache, capsys):
    load_dataset("reuters")
    stderr = capsys.readouterr().err
    for name in (*corpora.REUTERS_TOKEN_FILES, corpora.REUTERS_QRELS):
        sha256 = hashlib.sha256((reuters_dir / name).read_bytes()).hexdigest()
        assert f"{reuters_dir / name}: checksum not pinned; got sha256 {sha256}" in stderr
        assert (cache / "reuters" / f"{name}.sha256").read_text() == f"{sha256}  {name}\n"


def test_a_changed_file_no_longer_matches_its_first_use_record(reuters_dir, cache):
    load_dataset("reuters")
    recorded = (cache / "reuters" / f"{TRAIN}.sha256").read_text().split()[0]
    _write_gz(reuters_dir / TRAIN, _token_text({5: "rate bank bank", 6: "elect"}))
    (cache / "reuters" / data._REGISTRY["reuters"].features_cache).unlink()  # else nothing is re-read
    message = (rf"dataset file {reuters_dir / TRAIN} is corrupt: sha256 is {HEX64}, should be {recorded} "
               rf"\(recorded on first use in {cache / 'reuters' / TRAIN}\.sha256\); delete or replace it")
    with pytest.raises(DataError, match=message):
        load_dataset("reuters")


def test_download_of_an_unpinned_file_is_recorded_then_verified(tmp_path, cache, capsys):
    spec = data._FileSpec("notes.gz", None, None, "sub/")
    (tmp_path / "mirror" / "sub").mkdir(parents=True)
    (tmp_path / "mirror" / "sub" / "notes.gz").write_bytes(b"first")
    path = data._fetch(spec, [(tmp_path / "mirror").as_uri()], cache / "x")
    sha256 = hashlib.sha256(b"first").hexdigest()
    assert path.read_bytes() == b"first"
    assert f"checksum not pinned; got sha256 {sha256}, recorded in {cache / 'x' / 'notes.gz.sha256'}" in capsys.readouterr().err
    path.unlink()
    (tmp_path / "mirror" / "sub" / "notes.gz").write_bytes(b"second")  # the mirror now serves other bytes
    with pytest.raises(DataError, match=rf"file://.*/mirror/sub/notes\.gz: checksum mismatch, sha256 is {HEX64}, "
                                        rf"should be {sha256} \(recorded on first use in .*notes\.gz\.sha256\)"):
        data._fetch(spec, [(tmp_path / "mirror").as_uri()], cache / "x")
    assert sorted(p.name for p in (cache / "x").iterdir()) == ["notes.gz.sha256"]  # no partial download


def test_malformed_record_is_named(reuters_dir, cache):
    (cache / "reuters").mkdir(parents=True)
    (cache / "reuters" / f"{corpora.REUTERS_QRELS}.sha256").write_text("abc\n")
    with pytest.raises(DataError, match=r"checksum record .*qrels\.gz\.sha256 should start with a 64-digit hex "
                                        r"sha256, got 'abc\\n'; delete it"):
        load_dataset("reuters")


# --- STL-10: formats and features ------------------------------------------------------------------


def _stl_bytes(images: np.ndarray) -> bytes:
    """``images`` (n, 96, 96, 3) in the STL-10 layout: per image the R, G, B planes, each column-major."""
    return images.transpose(0, 3, 2, 1).tobytes()


def test_stl10_images_are_stored_column_major_one_channel_at_a_time():
    raw = np.zeros(3 * 96 * 96, dtype=np.uint8)
    raw[:96] = 255  # red plane, first 96 bytes: the left column, top to bottom
    raw[96 * 96 + 1] = 7  # green plane, second byte: row 1 of column 0
    raw[2 * 96 * 96 + 96] = 9  # blue plane, byte 96: row 0 of column 1
    image = corpora.stl10_images(raw.tobytes(), "train_X.bin")
    assert image.shape == (1, 96, 96, 3) and image.dtype == np.uint8
    assert (image[0, :, 0, 0] == 255).all() and (image[0, 0, 1:, 0] == 0).all()
    assert image[0, 1, 0, 1] == 7 and image[0, 0, 1, 2] == 9 and image.sum() == 96 * 255 + 16


def test_stl10_labels_become_0_to_9_and_bad_files_are_named():
    np.testing.assert_array_equal(corpora.stl10_labels(bytes([1, 10, 3]), 3, "y.bin"), [0, 9, 2])
    with pytest.raises(ValueError, match=r"y\.bin: labels should be 1\.\.10, found 0"):
        corpora.stl10_labels(bytes([1, 0]), 2, "y.bin")
    with pytest.raises(ValueError, match=r"y\.bin: 2 labels, should be one per image \(3\)"):
        corpora.stl10_labels(bytes([1, 2]), 3, "y.bin")
    with pytest.raises(ValueError, match=r"x\.bin: 100 bytes is not a whole number of 96x96x3 images"):
        corpora.stl10_images(bytes(100), "x.bin")


def test_colour_map_of_constant_and_half_red_images():
    constant = np.empty((1, 96, 96, 3), dtype=np.uint8)
    constant[...] = (10, 20, 30)
    np.testing.assert_array_equal(corpora.colour_map(constant), [np.tile([10, 20, 30], 64)])
    half = np.zeros((1, 96, 96, 3), dtype=np.uint8)
    half[:, :, :48, 0] = 200  # the left half red
    colours = corpora.colour_map(half).reshape(8, 8, 3)  # (row, column, RGB)
    assert (colours[:, :4, 0] == 200).all() and (colours[:, 4:] == 0).all() and (colours[..., 1:] == 0).all()


def test_hog_of_edges_fills_the_bin_of_the_gradient_direction():
    vertical = np.zeros((1, 96, 96), dtype=np.float32)
    vertical[:, :, 50:] = 1.0  # a vertical edge: the gradient is horizontal, 0 degrees
    per_bin = corpora.hog(vertical).reshape(-1, 9).sum(axis=0)
    assert per_bin[0] > 0 and (per_bin[1:] == 0).all()
    horizontal = vertical.transpose(0, 2, 1)  # gradient at 90 degrees: bin 4 covers [80, 100)
    per_bin = corpora.hog(horizontal).reshape(-1, 9).sum(axis=0)
    assert per_bin[4] > 0 and np.delete(per_bin, 4).sum() == 0
    assert not corpora.hog(np.full((1, 96, 96), 0.5, dtype=np.float32)).any()  # no gradient, no votes


@pytest.mark.parametrize(("height", "width", "length"), [(96, 96, 11 * 11 * 4 * 9), (37, 50, 3 * 5 * 4 * 9), (16, 16, 36)])
def test_hog_length_is_blocks_times_cells_per_block_times_bins(height, width, length):
    # block rows = height // 8 - 2 + 1; pixels past the last whole cell are ignored
    assert corpora.hog(np.zeros((2, height, width), dtype=np.float32)).shape == (2, length)


def test_hog_of_too_small_images_is_refused():
    with pytest.raises(ValueError, match=r"images of 12x40 pixels hold fewer than block=2 cells of 8 pixels"):
        corpora.hog(np.zeros((1, 12, 40), dtype=np.float32))


def test_hog_matches_scikit_image_on_one_block():
    r, c = np.mgrid[:16, :16]
    grey = (((3 * r + 5 * c) % 16 + (r * c) % 7) / 22.0).astype(np.float32)
    # skimage.feature.hog(grey, 9, (8, 8), (2, 2), 'L2-Hys') from scikit-image 0.26.0, computed once
    reference = [
        [0.234645, 0.249555, 0.249555, 0.143193, 0.161510, 0.104741, 0.036471, 0.075713, 0.018461],
        [0.219225, 0.249555, 0.249555, 0.218441, 0.206286, 0.042855, 0.146505, 0.084620, 0.022831],
        [0.168998, 0.249555, 0.249555, 0.182905, 0.129849, 0.018050, 0.064254, 0.074174, 0.000000],
        [0.202794, 0.249555, 0.249555, 0.176524, 0.181527, 0.104741, 0.036471, 0.075713, 0.018461],
    ]
    np.testing.assert_allclose(corpora.hog(grey[None]).reshape(4, 9), reference, atol=1e-6)
    assert np.linalg.norm(reference) == pytest.approx(1.0, abs=1e-5)  # L2-Hys ends on a unit norm


# --- STL-10: archive, download, features cache ---------------------------------------------------------


def _stl_archive(path: Path, images: np.ndarray, labels: list[int], leave_out: str | None = None) -> Path:
    """A synthetic ``stl10_binary.tar.gz``: 3 train and the rest test images, plus members parsing skips."""
    members = {
        "class_names.txt": b"airplane\nbird\n",
        "test_X.bin": _stl_bytes(images[3:]), "test_y.bin": bytes(labels[3:]),
        "train_X.bin": _stl_bytes(images[:3]), "train_y.bin": bytes(labels[:3]),
        "unlabeled_X.bin": _stl_bytes(images[:1]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            if name != leave_out:
                info = tarfile.TarInfo(f"stl10_binary/{name}")
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return path


@pytest.fixture
def stl_mirror(tmp_path) -> tuple[Path, np.ndarray]:
    """A file:// mirror directory serving a 5-image archive, and the images (n, 96, 96, 3)."""
    images = np.random.default_rng(0).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    _stl_archive(tmp_path / "mirror" / corpora.STL10_ARCHIVE, images, [1, 2, 10, 4, 5])
    return tmp_path / "mirror", images


def _pin_stl10(monkeypatch, archive: Path) -> None:
    """Pin the registry's STL-10 md5 to that of ``archive``; the sha256 stays unpinned."""
    entry = data._REGISTRY["stl10"]
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(data._REGISTRY, "stl10", dataclasses.replace(entry, files=(
        dataclasses.replace(entry.files[0], md5=md5),)))


def test_stl10_download_with_a_wrong_checksum_names_the_file(stl_mirror, cache, monkeypatch):
    monkeypatch.setattr(data, "STL10_MIRRORS", (stl_mirror[0].as_uri(),))
    message = (r"could not download stl10_binary\.tar\.gz into .*: file://.*/mirror/stl10_binary\.tar\.gz: "
               r"checksum mismatch, md5 is [0-9a-f]{32}, should be 91f7769df0f17e558f3565bffb0c7dfb")
    with pytest.raises(DataError, match=message):
        load_dataset("stl10")
    assert list((cache / "stl10").iterdir()) == []


def test_stl10_is_downloaded_parsed_and_its_features_cached(stl_mirror, cache, monkeypatch, capsys):
    mirror, images = stl_mirror
    _pin_stl10(monkeypatch, mirror / corpora.STL10_ARCHIVE)
    monkeypatch.setattr(data, "STL10_MIRRORS", (mirror.as_uri(),))
    ds = load_dataset("stl10")
    assert ds.name == "stl10" and ds.image_shape is None and ds.default_scaling == "standard"
    assert ds.x.shape == (5, 4356 + 192) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.y, [0, 1, 9, 3, 4])  # train then test, 1..10 -> 0..9
    np.testing.assert_array_equal(ds.x[:, -192:], corpora.colour_map(images))
    assert "checksum not pinned; got sha256" in capsys.readouterr().err  # md5 pinned, sha256 on first use
    cached = sorted(p.name for p in (cache / "stl10").iterdir())
    assert cached == ["stl10-hog-colour-v1.npz", "stl10_binary.tar.gz", "stl10_binary.tar.gz.sha256"]

    (cache / "stl10" / corpora.STL10_ARCHIVE).unlink()
    monkeypatch.setattr(data, "STL10_MIRRORS", ())
    np.testing.assert_array_equal(load_dataset("stl10").x, ds.x)  # from the cache: no archive needed

    entry = data._REGISTRY["stl10"]  # a new preprocessing version names a new cache file
    monkeypatch.setitem(data._REGISTRY, "stl10", dataclasses.replace(entry, features_cache="stl10-v2.npz"))
    with pytest.raises(DataError, match=r"could not download stl10_binary\.tar\.gz .*no mirrors configured"):
        load_dataset("stl10")


def test_corrupt_features_cache_is_named(cache):
    path = cache / "stl10" / data._REGISTRY["stl10"].features_cache
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz")
    with pytest.raises(DataError, match=rf"dataset 'stl10': features cache {path} is unreadable .*; delete it"):
        load_dataset("stl10")


def test_stl10_archive_without_a_member_is_named(tmp_path, cache, monkeypatch):
    images = np.zeros((5, 96, 96, 3), dtype=np.uint8)
    archive = _stl_archive(cache / "stl10" / corpora.STL10_ARCHIVE, images, [1] * 5, leave_out="test_y.bin")
    _pin_stl10(monkeypatch, archive)
    with pytest.raises(DataError, match=rf"dataset 'stl10': {archive}: should hold "
                                        r"stl10_binary/\{train_X\.bin,train_y\.bin,test_X\.bin,test_y\.bin\}; "
                                        r"missing: test_y\.bin"):
        load_dataset("stl10")
