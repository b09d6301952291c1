"""`poolsvc run-batch`: every URL kind of an OpenAI batch file and every plain input and output
format against the offline API; SIGKILL at a commit and in the middle of a write, then resume,
against an uninterrupted run; bad rows in the error file; progress lines; refusals."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from poolsvc import PoolingParams
from poolsvc.batch.config import BatchConfig
from poolsvc.batch.run import FAULT_VARIABLE, BatchError, run_batch
from poolsvc.engine.config import BUNDLED_MODEL, ModelSpec

QUERIES = [json.loads(line)["text"] for line in
           (ROOT / "bench" / "data" / "queries.jsonl").read_text().splitlines()]
TOO_LONG = "word " * 600  # over MiniLM's 256 tokens


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def batch(config_input: Path, output: Path, **kw) -> BatchConfig:
    return BatchConfig(input=str(config_input), output=str(output), threads=2, **kw)


def request(custom_id: str, url: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, minilm_path) -> Path:
    from tiny_models import bert_classifier
    return bert_classifier(tmp_path_factory.mktemp("clf") / "clf", minilm_path, 3, seed=2,
                           id2label={0: "negative", 1: "neutral", 2: "positive"})


def test_batch_file_round_trip_for_every_url(tmp_path, llm, classifier):
    from poolsvc import LLM

    docs = ["a small feline", "a big dog", "the cat sat"]
    lines = [
        request("emb", "/v1/embeddings", model="all-MiniLM-L6-v2", input=QUERIES[:3]),
        request("emb64", "/v1/embeddings", input=QUERIES[3], encoding_format="base64",
                dimensions=64),
        "",  # blank lines are skipped, as vLLM does
        request("score", "/score", text_1="what is a cat?", text_2=docs),
        request("vscore", "/v1/score", text_1=docs, text_2=docs[::-1]),
        request("rerank", "/v1/rerank", query="what is a cat?", documents=docs, top_n=2),
        request("rerank-ids", "/rerank", query="a cat", documents=docs, return_documents=False),
        request("pool", "/pooling", input="Hello, my name is"),
        request("clf", "/classify", model="clf", input=["I love it", "meh"]),
        request("bad-url", "/v1/chat/completions", messages=[]),
        "{not json",
        request("no-model", "/v1/embeddings", model="nope", input="x"),
        request("long", "/v1/embeddings", input=TOO_LONG),
        request("long-cut", "/v1/embeddings", input=TOO_LONG, truncate_prompt_tokens=-1),
        request("unknown-key", "/v1/embeddings", input="x", temperature=0.5),
    ]
    src = write_lines(tmp_path / "batch.jsonl", lines)
    out = tmp_path / "out.jsonl"
    summary = run_batch(batch(src, out, models=(ModelSpec(BUNDLED_MODEL),
                                                ModelSpec(str(classifier), "clf"))))
    assert summary.rows == len(lines)
    got = {r["custom_id"]: r for r in read_jsonl(out)}
    assert len(read_jsonl(out)) == len(lines) - 1  # one line per request line
    body = {k: r["response"]["body"] for k, r in got.items()}
    status = {k: r["response"]["status_code"] for k, r in got.items()}

    want = [o.outputs.embedding for o in llm.embed(QUERIES[:3])]
    assert status["emb"] == 200 and got["emb"]["error"] is None
    assert body["emb"]["object"] == "list" and body["emb"]["model"] == "all-MiniLM-L6-v2"
    assert [d["index"] for d in body["emb"]["data"]] == [0, 1, 2]
    assert {d["object"] for d in body["emb"]["data"]} == {"embedding"}
    np.testing.assert_allclose([d["embedding"] for d in body["emb"]["data"]], want, atol=1e-5)
    tokens = sum(len(o.prompt_token_ids) for o in llm.embed(QUERIES[:3]))
    assert body["emb"]["usage"]["prompt_tokens"] == body["emb"]["usage"]["total_tokens"] == tokens

    (small,) = llm.embed(QUERIES[3], PoolingParams(dimensions=64))
    packed = np.frombuffer(base64.b64decode(body["emb64"]["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(packed, small.outputs.embedding, atol=1e-5)

    scores = [o.outputs.score for o in llm.score("what is a cat?", docs)]
    assert [d["object"] for d in body["score"]["data"]] == ["score"] * 3
    np.testing.assert_allclose([d["score"] for d in body["score"]["data"]], scores, atol=1e-5)
    zipped = [o.outputs.score for o in llm.score(docs, docs[::-1])]
    np.testing.assert_allclose([d["score"] for d in body["vscore"]["data"]], zipped, atol=1e-5)

    ranked = body["rerank"]["results"]
    best = np.argsort(scores)[::-1][:2]
    assert [r["index"] for r in ranked] == list(best)
    assert [r["document"]["text"] for r in ranked] == [docs[i] for i in best]
    np.testing.assert_allclose([r["relevance_score"] for r in ranked],
                               [scores[i] for i in best], atol=1e-5)
    assert len(body["rerank-ids"]["results"]) == 3
    assert all("document" not in r for r in body["rerank-ids"]["results"])

    (per_token,) = llm.encode("Hello, my name is")
    np.testing.assert_allclose(body["pool"]["data"][0]["data"], per_token.outputs.data.numpy(),
                               atol=1e-5)

    with LLM(str(classifier), threads=2) as clf:
        probs = [o.outputs.probs for o in clf.classify(["I love it", "meh"])]
    data = body["clf"]["data"]
    np.testing.assert_allclose([d["probs"] for d in data], probs, atol=1e-5)
    assert [d["label"] for d in data] == [["negative", "neutral", "positive"][int(np.argmax(p))]
                                          for p in probs]
    assert [d["num_classes"] for d in data] == [3, 3]

    assert status["bad-url"] == 400 and "/v1/embeddings" in got["bad-url"]["error"]["message"]
    assert status["no-model"] == 404 and "served: all-MiniLM-L6-v2, clf" in \
        body["no-model"]["error"]["message"]
    assert status["long"] == 400 and "truncate_prompt_tokens" in got["long"]["error"]["message"]
    assert status["long-cut"] == 200
    assert status["unknown-key"] == 400 and "temperature" in got["unknown-key"]["error"]["message"]
    assert status[None] == 400 and "not JSON" in got[None]["error"]["message"]
    # each failed line is in the error file too, with its line number
    errors = read_jsonl(Path(str(out) + ".errors.jsonl"))
    assert [(e["line"], e.get("custom_id")) for e in errors] == [
        (10, "bad-url"), (11, None), (12, "no-model"), (13, "long"), (15, "unknown-key")]


def test_texts_into_npy_and_parquet(tmp_path, llm):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": t, "doc": f"d{i}"} for i, t in enumerate(QUERIES[:20])]
    rows[3] = {"text": "", "doc": "empty"}
    rows[5] = "{broken"
    rows[7] = {"body": "no text field", "doc": "missing"}
    rows[11] = {"text": TOO_LONG, "doc": "long"}
    rows[13] = {"text": 42, "doc": "number"}
    src = write_lines(tmp_path / "texts.jsonl", rows)
    good = [i for i in range(20) if i not in (3, 5, 7, 11, 13)]
    want = np.array([o.outputs.embedding for o in llm.embed([QUERIES[i] for i in good])])

    npy = tmp_path / "vectors.npy"
    summary = run_batch(batch(src, npy, chunk_rows=8))
    assert (summary.rows, summary.errors) == (20, 5)
    vectors = np.load(npy)
    assert vectors.shape == (20, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors[good], want, atol=1e-5)
    assert np.isnan(vectors[[3, 5, 7, 11, 13]]).all()  # a bad row's vector is NaN
    errors = read_jsonl(Path(str(npy) + ".errors.jsonl"))
    assert [(e["row"], e["line"]) for e in errors] == [(3, 4), (5, 6), (7, 8), (11, 12), (13, 14)]
    reasons = [e["error"] for e in errors]
    assert "empty" in reasons[0] and "not JSON" in reasons[1] and "--field" in reasons[2]
    assert "--auto-truncate" in reasons[3] and "int, not text" in reasons[4]

    # Parquet, with ids from a field; int8 compact vectors as the service makes them
    parquet = tmp_path / "vectors.parquet"
    run_batch(batch(src, parquet, id_field="doc", output_dtype="int8", chunk_rows=8,
                    auto_truncate=True))
    table = pq.read_table(parquet)
    assert table.column("id").to_pylist()[:4] == ["d0", "d1", "d2", "empty"]
    embedding = table.column("embedding")
    assert embedding.type == pa.list_(pa.int8(), 384)
    assert embedding.null_count == 4  # the long row is truncated this time
    int8 = llm.embed([QUERIES[i] for i in good], PoolingParams(out_dtype="int8"))
    got = embedding.to_pylist()
    assert [got[i] for i in good] == [o.outputs.embedding for o in int8]
    assert not os.path.exists(str(parquet) + ".parts")

    # plain text lines in; Parquet in (a column, row groups), binary vectors out
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join(QUERIES[:6]) + "\n")
    run_batch(batch(txt, tmp_path / "txt.npy", dimensions=32))
    small = llm.embed(QUERIES[:6], PoolingParams(dimensions=32))
    np.testing.assert_allclose(np.load(tmp_path / "txt.npy"),
                               [o.outputs.embedding for o in small], atol=1e-5)
    pq.write_table(pa.table({"passage": QUERIES[:10], "n": list(range(100, 110))}),
                   tmp_path / "in.parquet", row_group_size=4)
    run_batch(batch(tmp_path / "in.parquet", tmp_path / "bits.npy", field="passage",
                    output_dtype="binary", chunk_rows=3))
    bits = llm.embed(QUERIES[:10], PoolingParams(out_dtype="binary"))
    assert np.load(tmp_path / "bits.npy").tolist() == [o.outputs.embedding for o in bits]


def test_reading_and_writing_hold_a_few_chunks_whatever_the_input_size(tmp_path):
    """The pipeline around the engine streams: the Python memory peak while reading rows ahead
    and writing their vectors is the same for 80,000 rows as for 20,000 (the whole input would
    be tens of MB). The 1M-line measurement of the whole command is in docs/run-batch.md."""
    import tracemalloc

    from poolsvc.batch.inputs import read_chunks
    from poolsvc.batch.outputs import NpyFile

    def peak(rows: int) -> int:
        src = tmp_path / f"{rows}.jsonl"
        with open(src, "w") as f:
            for i in range(rows):
                f.write(json.dumps({"text": f"{QUERIES[i % 5000]} #{i}"}) + "\n")
        config = batch(src, tmp_path / f"{rows}.npy", chunk_rows=512)
        sink = NpyFile(config.output, rows, 384, np.dtype(np.float32), fresh=True)
        tracemalloc.start()
        for chunk in read_chunks(config, 0, 0):
            sink.write(chunk.rows[0].index, np.zeros((len(chunk.rows), 384), np.float32))
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        sink.close()
        return top

    small, large = peak(20_000), peak(80_000)
    chunk_vectors = 512 * 384 * 4
    assert large < small + chunk_vectors, (small, large)
    assert large < 8 * chunk_vectors  # a few chunks of rows and vectors, not the input


def test_progress_lines_when_not_a_tty(tmp_path, caplog):
    src = write_lines(tmp_path / "q.jsonl", [{"text": t} for t in QUERIES[:10]])
    with caplog.at_level(logging.INFO, logger="poolsvc.batch"):
        run_batch(batch(src, tmp_path / "q.npy", chunk_rows=4, progress_seconds=0))
    lines = [r.getMessage() for r in caplog.records if r.name == "poolsvc.batch"]
    progress = [line for line in lines if "rows (" in line and not line.startswith("done")]
    assert [line.split(" rows")[0] for line in progress] == ["4/10", "8/10", "10/10"]
    assert all("tokens/s" in line and "ETA" in line for line in progress)
    assert lines[-1].startswith("done: 10/10 rows (100.0%)")


def test_progress_bar_on_a_tty(capsys):
    from poolsvc.batch.progress import Progress
    progress = Progress(total_rows=10, done_rows=2, interval=10.0, tty=True)
    progress.update(4, 100)
    progress.close()
    err = capsys.readouterr().err
    assert "6/10" in err and "tok/s" in err and "row" in err


def test_refuses_to_resume_with_other_arguments_or_input(tmp_path, caplog):
    src = write_lines(tmp_path / "q.jsonl", [{"text": t} for t in QUERIES[:4]])
    out = tmp_path / "q.npy"
    run_batch(batch(src, out))
    first = np.load(out)
    with caplog.at_level(logging.INFO, logger="poolsvc.batch"):
        assert run_batch(batch(src, out)).rows == 0  # complete: nothing to do
    assert "already complete" in caplog.text
    with pytest.raises(BatchError, match=r"--dimensions was '0', now '16'.*--overwrite"):
        run_batch(batch(src, out, dimensions=16))
    with pytest.raises(BatchError, match="--model"):
        run_batch(batch(src, out, models=(ModelSpec("/elsewhere/model"),)))
    write_lines(src, [{"text": t} for t in QUERIES[:5]])
    with pytest.raises(BatchError, match="the input file changed"):
        run_batch(batch(src, out))
    np.testing.assert_array_equal(np.load(out), first)  # untouched by the refusals
    # an output run-batch did not write is never overwritten unless asked
    other = tmp_path / "other.npy"
    np.save(other, np.zeros(3))
    with pytest.raises(BatchError, match=r"other.npy exists .* --overwrite"):
        run_batch(batch(src, other))
    run_batch(batch(src, other, overwrite=True))
    assert np.load(other).shape == (5, 384)


def test_bad_arguments_are_one_clear_line():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "poolsvc", "run-batch", *args],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)

    help_text = cli("--help").stdout
    for flag in ("-i INPUT", "-o OUTPUT", "--model", "--dtype", "--threads", "--pooler-config",
                 "--max-model-len", "--output-dtype", "--id-field", "--overwrite"):
        assert flag in help_text, flag
    done = cli("-i", "README.md", "-o", "out.csv")
    assert done.returncode == 2 and "write .jsonl" in done.stderr and ".npy" in done.stderr
    done = cli("-i", "missing.jsonl", "-o", "out.npy")
    assert done.returncode == 2 and "missing.jsonl: no such file" in done.stderr
    done = cli("-i", "bench/data/queries.jsonl", "-o", "out.npy", "--id-field", "x")
    assert done.returncode == 2 and "Parquet output's id column" in done.stderr


# --- killed, then resumed ------------------------------------------------------------------------

def run_cli(src: Path, out: Path, *args: str, fault: str = "") -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if fault:
        env[FAULT_VARIABLE] = fault
    return subprocess.Popen([sys.executable, "-m", "poolsvc", "run-batch", "-i", str(src),
                             "-o", str(out), "--threads", "2", "--chunk-rows", "16", *args],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def killed_at_a_commit(src: Path, out: Path, commit: int) -> dict:
    """Runs until its `commit`-th checkpoint, stopped there, then SIGKILLed from outside."""
    proc = run_cli(src, out, fault=f"stop-after-commit:{commit}")
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), proc.communicate()
    proc.kill()
    proc.wait()
    return json.loads(Path(str(out) + ".checkpoint.json").read_text())


def killed_mid_write(src: Path, out: Path, commit: int) -> None:
    proc = run_cli(src, out, fault=f"kill-mid-write:{commit}")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err


def finish(src: Path, out: Path, **kw) -> int:
    """The same command again, to the end (in this process); returns the rows it committed."""
    return run_batch(batch(src, out, chunk_rows=16, **kw)).rows


def test_batch_file_resumes_after_sigkill(tmp_path, caplog):
    lines = [request(f"r{i}", "/v1/embeddings", input=[t, t.upper()])
             for i, t in enumerate(QUERIES[:70])]
    lines[20] = "{cut"
    src = write_lines(tmp_path / "batch.jsonl", lines)
    reference = tmp_path / "reference.jsonl"
    run_batch(batch(src, reference, chunk_rows=16))

    out = tmp_path / "out.jsonl"
    state = killed_at_a_commit(src, out, 2)
    assert state["rows"] == 32 and not state["done"]
    assert len(read_jsonl(out)) == 32
    with open(out, "ab") as f:  # a partial write past the checkpoint
        f.write(b'{"id": "batch-half-written", "custom_id": "r3')
    killed_mid_write(src, out, 2)  # resumes, commits 16 rows, then dies halfway through 16
    state = json.loads(Path(str(out) + ".checkpoint.json").read_text())
    assert state["rows"] == 48 and os.path.getsize(out) > state["output_bytes"]
    caplog.set_level(logging.INFO, logger="poolsvc.batch")
    assert finish(src, out) == 70 - 48
    assert "resuming" in caplog.text and "at row 48 of 70" in caplog.text

    got, want = read_jsonl(out), read_jsonl(reference)
    assert [r["custom_id"] for r in got] == [r["custom_id"] for r in want]  # each once, in order
    for a, b in zip(got, want):
        assert a["id"] == b["id"] and a["response"]["status_code"] == \
            b["response"]["status_code"]
        if a["error"] is None:
            np.testing.assert_allclose(
                [d["embedding"] for d in a["response"]["body"]["data"]],
                [d["embedding"] for d in b["response"]["body"]["data"]], atol=1e-5)
    errors = read_jsonl(Path(str(out) + ".errors.jsonl"))
    assert [e["line"] for e in errors] == [21]  # written once, though a run died after it


def test_npy_and_parquet_resume_after_sigkill(tmp_path):
    rows = [{"text": t, "k": i} for i, t in enumerate(QUERIES[:60])]
    rows[40] = {"text": ""}
    src = write_lines(tmp_path / "texts.jsonl", rows)
    reference = tmp_path / "reference.npy"
    run_batch(batch(src, reference, chunk_rows=16))

    out = tmp_path / "out.npy"
    state = killed_at_a_commit(src, out, 1)
    assert state["rows"] == 16
    np.load(out, mmap_mode="r+")[16:] = 7.0  # garbage past the checkpoint
    killed_mid_write(src, out, 2)  # commits rows 16-31, writes half of 32-47, dies
    assert json.loads(Path(str(out) + ".checkpoint.json").read_text())["rows"] == 32
    assert finish(src, out) == 60 - 32
    got, want = np.load(out), np.load(reference)
    assert np.isnan(got[40]).all() and np.isnan(want[40]).all()
    np.testing.assert_allclose(np.delete(got, 40, 0), np.delete(want, 40, 0), atol=1e-5)
    assert [e["row"] for e in read_jsonl(Path(str(out) + ".errors.jsonl"))] == [40]

    import pyarrow.parquet as pq
    parquet = tmp_path / "out.parquet"
    proc = run_cli(src, parquet, "--id-field", "k", fault="kill-mid-write:3")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert len(os.listdir(str(parquet) + ".parts")) == 3  # 2 committed + 1 not
    assert finish(src, parquet, id_field="k") == 60 - 32
    table = pq.read_table(parquet)
    assert table.column("id").to_pylist() == [str(i) if i != 40 else None for i in range(60)]
    vectors = table.column("embedding").to_pylist()
    assert vectors[40] is None
    np.testing.assert_allclose(np.array([v for i, v in enumerate(vectors) if i != 40]),
                               np.delete(want, 40, 0), atol=1e-5)
