"""Document reading, chunking, incremental embedding, HNSW vs exact, retrieval quality on SQuAD."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from runner import api
from runner.errors import RunnerError
from runner.steps.documents import chunk_text
from stores.vectors import VectorIndex, build, exact_search
from tests.conftest import SHARED_DATA, needs_shared_data, sql_rows

SQUAD = SHARED_DATA / "rag" / "squad2_dev_first5articles.json"


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF with `text` in Helvetica, written by hand (xref offsets computed)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


def index_recipe(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "r.yaml").write_text(
        f"index:\n  documents: [{{path: docs}}]\n  chunk: {{size: 200, overlap: 30}}\n{extra}"
    )
    return tmp_path / "r.yaml"


def test_every_document_type_and_rejects(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Plain text about rivers.")
    (docs / "b.md").write_text("# Title\n\nMarkdown about mountains.")
    (docs / "c.html").write_text(
        "<html><head><title>Page</title><script>x()</script></head><body><p>HTML about lakes.</p></body></html>"
    )
    (docs / "d.pdf").write_bytes(tiny_pdf("PDF about deserts"))
    (docs / "e.jsonl").write_text(
        json.dumps({"text": "Row one about forests."}) + "\n" + json.dumps({"text": "Row two about seas."}) + "\n"
    )
    (docs / "f.csv").write_text("text,other\nCSV row about islands.,x\n")
    (docs / "g.bin").write_bytes(b"\x00\x01")
    (docs / "h.txt").write_bytes(b"\xff\xfe bad")
    (docs / "i.md").write_text("   \n")
    b = api.load(index_recipe(tmp_path))
    result = api.apply(b)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    texts = dict(sql_rows(b, "select id, text from docs"))
    assert texts["docs/c.html"] == "Page\nHTML about lakes." or "HTML about lakes." in texts["docs/c.html"]
    assert "x()" not in texts["docs/c.html"]
    assert texts["docs/d.pdf"] == "PDF about deserts"
    assert texts["docs/e.jsonl#2"] == "Row two about seas." and texts["docs/f.csv#1"] == "CSV row about islands."
    rejects = dict(sql_rows(b, "select id, detail from docs__rejects"))
    assert rejects == {"docs/g.bin": "unsupported file type .bin", "docs/h.txt": "not UTF-8", "docs/i.md": "no text"}
    docs_rows = next(s for s in result.steps if s.name == "docs").artifact.manifest["rows"]
    assert docs_rows == {"in": 10, "rows": 7, "rejects": 3}


def test_chunking_respects_paragraphs_and_overlaps() -> None:
    paras = [" ".join(f"w{p}x{i}" for i in range(12)) for p in range(6)]
    chunks = chunk_text("\n\n".join(paras), 120, 20, len)
    assert all(len(c) <= 120 for c in chunks)
    assert chunks[0].startswith(paras[0]) and paras[0] in chunks[0]
    for prev, nxt in itertools.pairwise(chunks):  # each chunk repeats the tail of the one before
        assert nxt.split()[0] in prev.split()
    joined = " ".join(chunks)
    assert all(w in joined for p in paras for w in p.split())
    long = " ".join(f"t{i}" for i in range(300))
    assert all(len(c) <= 120 for c in chunk_text(long, 120, 0, len))


def test_adding_a_document_embeds_only_its_chunks(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(5):
        (docs / f"{i}.md").write_text(f"Document {i} talks about topic number {i}. " * 3)
    first = api.apply(api.load(index_recipe(tmp_path)))
    m1 = next(s for s in first.steps if s.name == "embed").artifact.manifest["metrics"]
    (docs / "new.md").write_text("A brand new document about something else entirely.")
    (docs / "0.md").write_text("Document zero was rewritten.")
    second = api.apply(api.load(index_recipe(tmp_path)))
    m2 = next(s for s in second.steps if s.name == "embed").artifact.manifest["metrics"]
    assert m1["embedded"] == 5 and m1["reused"] == 0
    assert m2["embedded"] == 2 and m2["reused"] == 4


def test_query_and_model_mismatch(tmp_path: Path, cli) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "cats.md").write_text("Cats are small domestic felines that purr and chase mice.")
    (docs / "rockets.md").write_text("Rockets burn fuel to produce thrust and reach orbit around the Earth.")
    (docs / "bread.md").write_text("Bread is baked from flour, water, yeast and salt in an oven.")
    path = index_recipe(tmp_path, "  hybrid: true\n")
    assert api.apply(api.load(path)).ok
    code, out, _ = cli("query", str(path), "how does a spacecraft get to orbit?", "-k", "1", "--json")
    assert code == 0 and json.loads(out)[0]["doc_id"] == "docs/rockets.md"
    code, out, _ = cli("query", str(path), "flour and yeast", "-k", "3", "--hybrid", "--json")
    assert json.loads(out)[0]["doc_id"] == "docs/bread.md"
    code, _, err = cli("query", str(path), "cats", "--model", "some-other-model")
    assert code == 1 and "built with embedding model 'all-MiniLM-L6-v2'" in err


def test_hnsw_matches_exact_search_on_random_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 48)).astype(np.float32)
    queries = rng.normal(size=(200, 48)).astype(np.float32)
    build(vectors, tmp_path / "ix", metric="cosine", m=16, ef_construction=200, exact=False, info={"model": "m"})
    labels, _ = VectorIndex.open(tmp_path / "ix", ef_search=128).search(queries, 10)
    truth, _ = exact_search(vectors, queries, 10, "cosine")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, truth, strict=False)])
    assert recall >= 0.98


@pytest.mark.slow
@needs_shared_data
def test_squad_retrieval_quality(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    squad = json.loads(SQUAD.read_text())
    paragraphs, questions = [], []
    for article in squad["data"]:
        for para in article["paragraphs"]:
            paragraphs.append({"text": para["context"]})
            questions += [(q["question"], len(paragraphs)) for q in para["qas"] if not q["is_impossible"]]
    assert len(paragraphs) == 173 and len(questions) == 705
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "squad.jsonl").write_text("".join(json.dumps(p) + "\n" for p in paragraphs))
    path = index_recipe(tmp_path, "  exact_below: 0\n")
    path.write_text(path.read_text().replace("chunk: {size: 200, overlap: 30}", "chunk: {size: 2000, overlap: 0}"))
    b = api.load(path)
    assert api.apply(b).ok
    r = api.retriever(b)
    qvecs = r.embed([q for q, _ in questions])
    hits = r.search_vectors(qvecs, [q for q, _ in questions], 5)
    recall5 = np.mean(
        [
            any(h.doc_id == f"docs/squad.jsonl#{gold}" for h in hs)
            for hs, (_, gold) in zip(hits, questions, strict=False)
        ]
    )
    # HNSW against exact search on the same embeddings
    exact = VectorIndex(info={**r.index.info, "exact": True}, vectors=_vectors(b))
    approx_labels, _ = r.index.search(qvecs, 10)
    exact_labels, _ = exact.search(qvecs, 10)
    recall10 = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_labels, exact_labels, strict=False)])
    with capsys.disabled():
        print(
            f"\nSQuAD (173 paragraphs, 705 answerable questions): recall@5 = {recall5:.3f}; "
            f"HNSW recall@10 vs exact = {recall10:.4f}"
        )
    assert recall5 >= 0.8
    assert recall10 >= 0.98


def _vectors(b: api.Build) -> np.ndarray:
    import pyarrow.parquet as pq

    t = pq.read_table(api.artifact(b, "embed").file("vectors.parquet"))
    return np.asarray(t.column("vector").combine_chunks().flatten().to_numpy(), dtype=np.float32).reshape(
        t.num_rows, -1
    )


def test_index_without_a_built_recipe_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("text")
    with pytest.raises(RunnerError, match="not built"):
        api.retriever(api.load(index_recipe(tmp_path)))


def test_retrieval_eval_records_recall_and_mrr(tmp_path: Path, cli) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "cats.md").write_text("Cats are small domestic felines that purr and chase mice.")
    (docs / "rockets.md").write_text("Rockets burn fuel to produce thrust and reach orbit around the Earth.")
    (docs / "bread.md").write_text("Bread is baked from flour, water, yeast and salt in an oven.")
    questions = [
        {"question": "what do felines chase?", "document": "docs/cats.md"},
        {"question": "how is bread made?", "document": "docs/bread.md"},
        {"question": "what produces thrust?", "document": "docs/rockets.md"},
        {"question": "who wrote Hamlet?", "document": "docs/missing.md"},
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    path = index_recipe(tmp_path, "  eval: {questions: q.jsonl, k: [1, 2]}\n")
    result = api.apply(api.load(path))
    ev = next(s for s in result.steps if s.name == "index.eval")
    assert ev.state == "failed" and "'docs/missing.md'" in (ev.error or "") and "match no indexed document" in ev.error
    # two relevant documents for one question: recall counts both
    questions[3] = {"question": "what burns fuel and what is baked?", "document": ["docs/rockets.md", "docs/bread.md"]}
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    b = api.load(path)
    result = api.apply(b)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    m = next(s for s in result.steps if s.name == "index.eval").artifact.manifest["metrics"]
    top = {r[0]: json.loads(r[1]) for r in sql_rows(b, "select question, top from index_eval__results")}
    assert m["questions"] == 4
    for k in (1, 2):  # independent: recall, MRR and nDCG from the stored rankings
        recalls, rrs, ndcgs = [], [], []
        for q in questions:
            gold = q["document"] if isinstance(q["document"], list) else [q["document"]]
            ranked = top[q["question"]][:k]
            recalls.append(len(set(ranked) & set(gold)) / len(gold))
            first = next((i for i, d in enumerate(ranked, 1) if d in gold), None)
            rrs.append(1 / first if first else 0)
            dcg = sum(1 / math.log2(i + 1) for i, d in enumerate(ranked, 1) if d in gold)
            ndcgs.append(dcg / sum(1 / math.log2(i + 1) for i in range(1, min(len(gold), k) + 1)))
        assert m[f"recall@{k}"] == pytest.approx(sum(recalls) / 4)
        assert m[f"mrr@{k}"] == pytest.approx(sum(rrs) / 4) and m[f"ndcg@{k}"] == pytest.approx(sum(ndcgs) / 4)
    assert m["recall@1"] < 1 and m["recall@2"] == 1.0  # the two-document question needs both results
    assert "chunk_recall@2" in m
