"""The whole indexing job, run once on the generated bad-input corpus (``bad_corpus.py``): every case ends
exactly where it should (one feature row, or one dead-letter row with its stage and reason), nothing is lost
or duplicated, the run report agrees, ``--max_error_rate`` gates publishing, a corrupt bundle stops the run
before any work, and a searcher refuses a query bundle that is not the index's model."""

from __future__ import annotations

import glob
import os
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest
from bad_corpus import DECODE_ERROR_TYPES, UNICODE_ID, Case, unlock, write_bad_corpus
from conftest import make_tiny_bundle, pipeline_flags

from pipelines.index_catalog import main, run
from pipelines.transforms.catalog import iter_raw_rows
from retrieval_core.bundle import WEIGHTS_FILE
from retrieval_core.index.publish import CURRENT_FILE, read_current
from retrieval_core.search import Searcher
from retrieval_core.search.searcher import ModelMismatchError

RUN_ID = "corpus"


def _flags(catalog: str, out: str, bundle: str, run_id: str, *extra: str) -> list[str]:
    return pipeline_flags(catalog, out, bundle, f"--run_id={run_id}", "--num_shards=2", "--batch_size=16", *extra)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_bundle):
    """The corpus, indexed once: (root, catalog, cases, report, feature rows, dead-letter rows)."""
    root = str(tmp_path_factory.mktemp("bad_corpus"))
    catalog, cases = write_bad_corpus(os.path.join(root, "corpus"))
    out = os.path.join(root, "out")
    try:
        report = run(_flags(catalog, out, tiny_bundle[0], RUN_ID))
        features = pq.read_table(glob.glob(f"{out}/features/run={RUN_ID}/*.parquet")).to_pylist()
        dead = pq.read_table(glob.glob(f"{out}/dead_letter/run={RUN_ID}/*.parquet")).to_pylist()
        yield {"root": root, "catalog": catalog, "out": out, "cases": cases, "report": report}, features, dead
    finally:
        unlock(os.path.join(root, "corpus"))


def _match_dead_letters(cases: list[Case], dead: list[dict]) -> tuple[dict[int, dict], list[dict]]:
    """Pair each dead-letter case with one dead-letter row (same item id and stage); return pairs and leftovers."""
    unused = list(dead)
    pairs = {}
    for n, case in enumerate(cases):
        if case.indexed:
            continue
        stage, _ = case.expected
        row = next((r for r in unused if r["item_id"] == case.item_id and r["stage"] == stage), None)
        if row is not None:
            unused.remove(row)
            pairs[n] = row
    return pairs, unused


def _failure_fraction(cases: list[Case]) -> float:
    failed = sum(not c.indexed for c in cases)
    return failed / len(cases)


def test_corpus_covers_enough_kinds(corpus):
    env, _, _ = corpus
    kinds = {c.kind for c in env["cases"]}
    assert len(kinds) >= 22, sorted(kinds)
    assert sum(c.indexed for c in env["cases"]) >= 15 and sum(not c.indexed for c in env["cases"]) >= 15


def test_indexed_cases_appear_exactly_once(corpus):
    env, features, _ = corpus
    counts = Counter(r["item_id"] for r in features)
    wrong = {c.item_id: counts[c.item_id] for c in env["cases"] if c.indexed and counts[c.item_id] != 1}
    assert not wrong, f"indexed cases not exactly once in the feature table: {wrong}"
    assert all(n == 1 for n in counts.values()), counts
    assert set(counts) == {c.item_id for c in env["cases"] if c.indexed}


def test_dead_letter_cases_have_their_stage_and_reason(corpus):
    env, features, dead = corpus
    cases = env["cases"]
    pairs, leftovers = _match_dead_letters(cases, dead)
    problems = []
    for n, case in enumerate(cases):
        if case.indexed:
            continue
        stage, error_type = case.expected
        row = pairs.get(n)
        if row is None:
            problems.append(f"{case}: no dead-letter row at stage {stage}")
            continue
        if error_type is not None and row["error_type"] != error_type:
            problems.append(f"{case}: error_type {row['error_type']!r}: {row['error_message']}")
        if error_type is None and case.error_types and row["error_type"] not in case.error_types:
            problems.append(f"{case}: error_type {row['error_type']!r} not one of {case.error_types}")
        if stage == "decode" and row["error_type"] not in DECODE_ERROR_TYPES:
            problems.append(f"{case}: undocumented decode error_type {row['error_type']!r}")
        if not (row["error_message"] or "").strip():
            problems.append(f"{case}: empty error_message")
        if row["run_id"] != RUN_ID or row["at"] is None:
            problems.append(f"{case}: incomplete dead-letter row {row}")
        # A line that did not parse has no row to keep (its line number is in the message); every other has one.
        if row["row_json"] is None and row["error_type"] != "malformed_row":
            problems.append(f"{case}: no row_json")
        if row["error_type"] == "malformed_row" and "line " not in row["error_message"]:
            problems.append(f"{case}: malformed row without its line number: {row['error_message']}")
    assert not problems, "\n".join(problems)
    assert not leftovers, f"dead-letter rows no case expects: {leftovers}"
    # The first 'dup-broken' is kept although its image is missing: its readable later duplicate must not
    # take its place in the feature table.
    assert "dup-broken" not in {r["item_id"] for r in features}


def test_nothing_lost_nothing_duplicated(corpus):
    env, features, dead = corpus
    cases = env["cases"]
    assert len(features) + len(dead) == len(cases)
    assert len(features) == sum(c.indexed for c in cases)
    assert len(dead) == sum(not c.indexed for c in cases)
    # The malformed lines have no item id: they are counted by row.
    assert sum(r["item_id"] is None for r in dead) == sum(c.item_id is None for c in cases)


def test_run_report_agrees(corpus):
    env, features, dead = corpus
    report = env["report"]
    assert report["status"] == "published"
    assert report["counts"]["indexed"] == len(features)
    assert report["counts"]["dead_letter"] == len(dead)
    assert report["error_rate"] == pytest.approx(_failure_fraction(env["cases"]), abs=1e-6)
    assert read_current(env["out"]) == RUN_ID


def test_awkward_values_survive(corpus):
    env, features, dead = corpus
    rows = {r["item_id"]: r for r in features}
    catalog = {item: dict(r["catalog"]) for item, r in rows.items()}
    assert catalog["extra-cols"] == {"product_id": "p36", "note": "red, with a comma"}
    assert catalog["latin1"]["note"] == "caf\ufffd cr\ufffdme"  # undecodable bytes replaced, the row kept
    assert catalog["multiline"]["note"] == "first line\r\nsecond line"
    assert catalog["good-1"] == {"product_id": "p1", "note": ""}  # the BOM is not part of the first column name
    assert rows[UNICODE_ID]["image_uri"].endswith(f"images/{UNICODE_ID}.jpg")
    assert (rows["exif6"]["width"], rows["exif6"]["height"]) == (20, 40)  # displayed size after rotation
    assert (rows["animated"]["width"], rows["animated"]["height"]) == (32, 24)
    assert (rows["grey16"]["width"], rows["grey16"]["height"]) == (40, 32)
    # Duplicates keep the first occurrence, also when only the surrounding spaces differ.
    assert rows["dup"]["image_uri"].endswith("dup-first.jpg") and catalog["dup"]["note"] == "first"
    assert rows["padded"]["image_uri"].endswith("images/padded.jpg")
    dup_rows = [r for r in dead if r["error_type"] == "duplicate_item_id"]
    assert sorted(r["image_uri"].rsplit("/", 1)[-1] for r in dup_rows) == [
        "dup-broken-second.jpg",
        "dup-second.jpg",
        "padded-dup.jpg",
    ]


@pytest.mark.parametrize(
    ("offset", "exit_code"),
    [(-0.05, 4), (0.0, 0), (0.05, 0)],
    ids=["below-rejected", "equal-published", "above-published"],
)
def test_max_error_rate_gates_publishing(corpus, tiny_bundle, tmp_path, offset, exit_code):
    env, _, _ = corpus
    rate = _failure_fraction(env["cases"]) + offset
    out = str(tmp_path / "out")
    code = main(_flags(env["catalog"], out, tiny_bundle[0], "gate", f"--max_error_rate={rate!r}"))
    assert code == exit_code
    # Written either way (manifest and report), published only when the error rate is acceptable.
    assert os.path.exists(os.path.join(out, "indices", "gate", "manifest.json"))
    assert os.path.exists(os.path.join(out, "runs", "gate.json"))
    if exit_code == 4:
        assert not os.path.exists(os.path.join(out, CURRENT_FILE))
    else:
        assert read_current(out) == "gate"


def test_corrupt_bundle_is_a_clear_usage_error(corpus, tiny_bundle, tmp_path, capsys):
    env, _, _ = corpus
    bundle = str(tmp_path / "corrupt-bundle")
    shutil.copytree(tiny_bundle[0], bundle)
    weights = os.path.join(bundle, WEIGHTS_FILE)
    with open(weights, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = str(tmp_path / "out")
    code = main(_flags(env["catalog"], out, bundle, "corrupt"))
    err = capsys.readouterr().err
    assert code == 2
    assert "error:" in err and bundle in err and "corrupt" in err, err
    assert "Traceback" not in err
    assert not os.path.exists(os.path.join(out, CURRENT_FILE))
    assert not glob.glob(os.path.join(out, "indices", "*", "manifest.json"))


def test_query_bundle_of_another_model_is_refused(corpus, tiny_bundle, tmp_path):
    env, features, _ = corpus
    other = make_tiny_bundle(str(tmp_path / "other-bundle"), seed=1)
    assert other.model_id != tiny_bundle[1].model_id
    with pytest.raises(ModelMismatchError, match=other.model_id):
        Searcher.open(env["out"], bundle=str(tmp_path / "other-bundle"))
    # The index's own bundle opens it, and an awkward indexed image finds itself.
    searcher = Searcher.open(env["out"], bundle=tiny_bundle[0])
    assert searcher.ntotal == len(features)
    image = os.path.join(os.path.dirname(env["catalog"]), "images", f"{UNICODE_ID}.jpg")
    assert searcher.search_images([image], k=1).item_ids == [[UNICODE_ID]]


def test_unterminated_quote_does_not_swallow_later_rows(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_bytes(b'item_id,image_uri,note\na,a.jpg,"12"" heels\nb,b.jpg,x\nc,c.jpg,y\n')
    records = list(iter_raw_rows(str(path)))
    rows = [row for _, row, _ in records if row is not None]
    errors = [error for _, _, error in records if error is not None]
    # The broken line is reported (a malformed_row dead letter), not kept with the rest of the file as its note,
    # and the rows after it are still read.
    assert len(errors) == 1, f"expected one error; rows parsed: {rows}, errors: {errors}"
    assert [n for n, row, _ in records if row is None] == [2]
    assert [row["item_id"] for row in rows] == ["b", "c"]
    assert not any("b.jpg" in str(row.get("note")) for row in rows), rows
