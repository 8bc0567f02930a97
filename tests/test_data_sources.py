"""Raw inputs of every supported kind, cleaning counters, bad inputs named or counted, and a prepare
that resumes after an interruption without trusting half-written files."""

import gzip
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline.prepare import prepare
from data_pipeline.shards import read_manifest
from megacore.config import DataConfig
from tests.helpers import megacore

DOCS = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog, {'again and ' * (i % 7)}done." for i in range(300)]


def _prepare(tmp_path, name, sources, **kw):
    cfg = DataConfig(dir=str(tmp_path / name), sources=sources, vocab_size=512, val_fraction=0.1, **kw)
    lines = []
    return prepare(cfg, log=lines.append), lines


def test_every_format_yields_the_same_documents(tmp_path):
    jsonl = "\n".join(json.dumps({"text": d}) for d in DOCS).encode()
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCS))
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (tmp_path / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    table = pa.table({"text": DOCS, "id": list(range(len(DOCS)))})
    pq.write_table(table, tmp_path / "docs.parquet")
    with pa.ipc.new_file(str(tmp_path / "docs.arrow"), table.schema) as w:
        w.write_table(table)
    with fsspec.open("memory://corpus/docs.txt", "w") as f:
        f.write("\n\n".join(DOCS))
    fingerprints = set()
    for source in ["docs.txt", "docs.jsonl.gz", "docs.jsonl.zst", "docs.parquet", "docs.arrow", "memory"]:
        url = "memory://corpus/*.txt" if source == "memory" else str(tmp_path / source)
        manifest, _ = _prepare(tmp_path, "out-" + source, [url])
        assert manifest["stats"]["kept"] == len(DOCS), source
        fingerprints.add(manifest["source_fingerprint"])
    assert len(fingerprints) == 1, "the same documents in any format give the same source fingerprint"


def test_cleaning_counts_what_it_drops_and_changes(tmp_path):
    docs = ["A normal paragraph of text."] * 3 + ["bell\x07 and escape\x1b removed", "x",
                                                  "y" * 5000, "Cafe\u0301 becomes one code point"]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs + DOCS))
    manifest, _ = _prepare(tmp_path, "out", [str(tmp_path / "in.jsonl")], min_doc_chars=2, max_doc_chars=4000)
    stats = manifest["stats"]
    assert stats["duplicates"] == 2 and stats["too_short"] == 1 and stats["too_long"] == 1
    assert stats["control_chars_removed"] == 2
    assert stats["kept"] == len(DOCS) + 3


def test_empty_binary_and_huge_inputs_are_skipped_counted_and_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_good.txt").write_text("\n\n".join(DOCS))
    (src / "b_empty.txt").write_text("")
    (src / "c_binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 40)
    (src / "d_one_line.txt").write_text("w" * (50 * 2**20))  # a 50 MB single line
    (src / "e_latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    manifest, log = _prepare(tmp_path, "out", [str(src / "*.txt")])
    text = "\n".join(log)
    stats = manifest["stats"]
    assert stats["empty_files"] == 1 and "b_empty.txt" in text
    assert stats["binary_files"] == 1 and "c_binary.txt" in text
    assert stats["too_long"] == 1
    assert stats["files_with_replaced_bytes"] == 1 and "e_latin1.txt" in text
    assert stats["kept"] == len(DOCS) + 1

    proc = megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={tmp_path / 'strict'}",
                    f"data.sources=[{src / 'e_latin1.txt'}]", "data.strict_utf8=true", check=False)
    assert proc.returncode == 2 and "e_latin1.txt" in proc.stderr


def test_truncated_gzip_is_an_error_naming_the_file_and_nothing_is_left(tmp_path):
    data = gzip.compress("\n".join(json.dumps({"text": d}) for d in DOCS).encode())
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    proc = megacore("data", "prepare", "configs/tiny.yaml", f"data.dir={out}", f"data.sources=[{bad}]", check=False)
    assert proc.returncode == 2 and "cut.jsonl.gz" in proc.stderr
    assert not out.exists() or not any(out.glob("*.arrow")) and not (out / "manifest.json").exists()


def test_corrupt_shard_is_detected_by_verify_and_a_truncated_one_by_the_loader(prepared_copy, tmp_path):
    assert megacore("data", "verify", prepared_copy).returncode == 0
    shard = prepared_copy / read_manifest(prepared_copy)["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = megacore("data", "verify", prepared_copy, check=False)
    assert proc.returncode == 2 and shard.name in proc.stderr and "sha256" in proc.stderr
    shard.write_bytes(bytes(data[: len(data) // 3]))
    proc = megacore("train", "configs/tiny.yaml", f"data.dir={prepared_copy}", f"train.run_dir={tmp_path / 'run'}",
                    "train.steps=1", check=False)
    assert proc.returncode == 2 and shard.name in proc.stderr


def test_missing_tokenizer_is_named(prepared_copy, tmp_path):
    (prepared_copy / "tokenizer.model").unlink()
    proc = megacore("train", "configs/tiny.yaml", f"data.dir={prepared_copy}", f"train.run_dir={tmp_path / 'run'}",
                    check=False)
    assert proc.returncode == 2 and str(prepared_copy / "tokenizer.model") in proc.stderr
    proc = megacore("data", "verify", prepared_copy, check=False)
    assert proc.returncode == 2 and "tokenizer.model: missing" in proc.stderr


def test_interrupted_prepare_resumes_and_rewrites_only_unfinished_shards(tmp_path):
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"text": d * 20}) for d in DOCS))
    first, _ = _prepare(tmp_path, "out", [str(tmp_path / "in.jsonl")], shard_mb=0.05)
    out = tmp_path / "out"
    shards = first["splits"]["train"]["shards"]
    assert len(shards) >= 4
    # The state an interruption can leave: no manifest yet, one shard written without its sidecar,
    # one renamed shard whose content is not what its sidecar says, and a temporary file.
    (out / "manifest.json").unlink()
    (out / (shards[1]["file"] + ".json")).unlink()
    (out / shards[2]["file"]).write_bytes(b"garbage")
    (out / "train-00099.arrow.tmp").write_bytes(b"partial")
    second, log = _prepare(tmp_path, "out", [str(tmp_path / "in.jsonl")], shard_mb=0.05)
    total = len(shards) + len(first["splits"]["val"]["shards"])
    assert f"({total - 2} finished shard(s) reused)" in log[-1]
    assert second["fingerprint"] == first["fingerprint"]
    assert not list(out.glob("*.tmp"))
    assert megacore("data", "verify", out).returncode == 0


def test_inspect_shows_statistics_and_a_decoded_sample(data_dir):
    out = megacore("data", "inspect", data_dir).stdout
    assert read_manifest(data_dir)["fingerprint"] in out
    assert "tokens/document" in out and "decoded" in out


def test_data_errors_are_user_errors_of_the_one_hierarchy():
    from data_pipeline.chat import ChatFormatError
    from data_pipeline.errors import DataPipelineError, ShardError, SourceError
    from megacore.errors import USER_ERRORS, DataError, MegacoreError

    assert DataPipelineError is DataError
    for cls in (DataError, SourceError, ShardError, ChatFormatError):
        assert issubclass(cls, MegacoreError) and issubclass(cls, USER_ERRORS) and issubclass(cls, ValueError)


def test_the_cli_reports_a_data_error_as_one_message_and_a_bug_with_its_traceback(tmp_path, monkeypatch, capsys):
    import data_pipeline.prepare
    from data_pipeline.errors import SourceError
    from launcher.torchrun import ERROR_DIR_ENV
    from megacore.cli import USAGE_ERROR, main

    monkeypatch.delenv(ERROR_DIR_ENV, raising=False)  # (a rank of `train --nproc` hands its message on)
    argv = ["data", "prepare", "configs/tiny.yaml", f"data.dir={tmp_path / 'x'}"]

    def refuse(data_cfg, log=print):
        raise SourceError(f"{tmp_path / 'x.txt'}: cannot be read")
    monkeypatch.setattr(data_pipeline.prepare, "prepare", refuse)
    assert main(argv) == USAGE_ERROR
    assert capsys.readouterr().err == f"megacore: error: {tmp_path / 'x.txt'}: cannot be read\n"

    def bug(data_cfg, log=print):
        raise ValueError("a bug")
    monkeypatch.setattr(data_pipeline.prepare, "prepare", bug)
    with pytest.raises(ValueError, match="a bug"):  # not turned into a data error: run() prints its traceback
        main(argv)


def test_a_manifest_of_an_unknown_version_or_not_json_is_refused_naming_the_file(prepared_copy, monkeypatch, capsys):
    from data_pipeline.errors import DataError
    from launcher.torchrun import ERROR_DIR_ENV
    from megacore.cli import USAGE_ERROR, main

    path = prepared_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "version": 9}))
    with pytest.raises(DataError, match=f"{path}: manifest: unsupported version 9"):
        read_manifest(prepared_copy)
    path.write_text("{not json")
    with pytest.raises(DataError, match=f"{path}: invalid JSON"):
        read_manifest(prepared_copy)
    monkeypatch.delenv(ERROR_DIR_ENV, raising=False)
    assert main(["data", "inspect", str(prepared_copy)]) == USAGE_ERROR
    assert capsys.readouterr().err.startswith(f"megacore: error: {path}: invalid JSON")
