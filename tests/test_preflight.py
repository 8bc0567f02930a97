"""Late failures refused before any process starts, naming the key or value: a data directory without a
usable val split, a URL as the run or data directory, and a Hugging Face init_from directory that asks
for what we would not reproduce. Real `megacore` processes."""

import json

import pytest

from data_pipeline.prepare import prepare
from megacore.config import DataConfig
from tests.helpers import REPO, failure_message, megacore, synthetic_docs, tiny_run_args

pytestmark = pytest.mark.processes


def _refused_before_start(proc, run_dir, *named):
    assert proc.returncode == 2, failure_message(proc)
    assert "torch.distributed" not in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists(), "nothing was started or written"
    for text in named:
        assert text in proc.stderr, (text, proc.stderr)


def test_a_data_directory_without_a_usable_val_split_is_refused_before_start(tmp_path, tiny_args):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_docs(300, 3, words_per_doc=8)))
    prepare(DataConfig(dir=str(tmp_path / "no_val"), sources=[str(source)], vocab_size=400, val_fraction=0.0),
            log=lambda *_: None)
    proc = megacore("train", *tiny_args("a", f"data.dir={tmp_path / 'no_val'}"), "--nproc", "2", check=False)
    _refused_before_start(proc, tmp_path / "a", "no 'val' split", "data.val_fraction")
    # A val split of a few short documents: fewer tokens than one window of seq_len + 1 = 65.
    for fraction in (0.005, 0.01, 0.015):
        tiny = tmp_path / f"val_{fraction}"
        try:
            manifest = prepare(DataConfig(dir=str(tiny), sources=[str(source)], vocab_size=400, val_fraction=fraction),
                               log=lambda *_: None)
        except ValueError:  # no document drawn for val at this fraction
            continue
        if manifest["splits"]["val"]["tokens"] < 65:
            break
    tokens = manifest["splits"]["val"]["tokens"]
    assert tokens < 65
    proc = megacore("train", *tiny_args("b", f"data.dir={tiny}"), "--nproc", "2", check=False)
    _refused_before_start(proc, tmp_path / "b", f"holds {tokens} tokens", "data.seq_len + 1 = 65")


def test_a_url_as_run_directory_or_a_store_without_its_backend_is_refused_naming_the_key(tiny_args, tmp_path):
    proc = megacore("train", *tiny_args("run", "train.run_dir=s3://bucket/run"), check=False)
    assert proc.returncode == 2 and "train.run_dir=s3://bucket/run is a URL" in proc.stderr
    assert not (REPO / "s3:").exists()
    # data.dir may be in object storage, but gs:// needs gcsfs, which the test environment does not have.
    proc = megacore("data", "prepare", "configs/tiny.yaml", "data.dir=gs://bucket/data", check=False)
    assert proc.returncode == 2 and "data.dir=gs://bucket/data: Please install gcsfs" in proc.stderr
    assert not (REPO / "gs:").exists()


@pytest.mark.parametrize("change, extra, named", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, [], "rope_scaling"),
    ({"attention_bias": True}, [], "attention_bias=True"),
    ({"sliding_window": 4096}, [], "sliding_window=4096"),
    ({"head_dim": 32}, [], "q_proj.weight of shape (64, 64), the model its config.json describes needs (128, 64)"),
    ({}, ["model.rope_theta=20000"], "model.rope_theta=20000 contradicts train.init_from"),
])
def test_hf_import_refuses_what_it_would_not_reproduce(small_run, data_dir, tmp_path, change, extra, named):
    """The directory defines the model; what it asks for that we do not implement, weights that do not fit
    its own config, and a model.* override that contradicts it are refused by name before any process."""
    hf = tmp_path / "hf"
    megacore("export-hf", small_run, hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **change}))
    proc = megacore("train", *tiny_run_args(data_dir, tmp_path / "run", f"train.init_from={hf}", *extra), check=False)
    assert proc.returncode == 2 and named in proc.stderr, failure_message(proc)
    assert not (tmp_path / "run").exists()
