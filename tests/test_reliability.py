"""Issue 28's unclear errors that are neither a run directory's nor a shard's: each is one
"... error:" paragraph, exit 2, before any work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from msgrun.export import ExportError, find_tokenizer, fresh_output


def test_export_out_that_cannot_be_created_is_refused_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ExportError, match=r"--out .*a_file/sub/out cannot be created: .*a_file is a file"):
        fresh_output(tmp_path / "a_file" / "sub" / "out")
    assert (tmp_path / "a_file").read_text() == "x"
    fresh_output(tmp_path / "missing" / "parent" / "out")  # a missing parent is created later: fine
    assert not (tmp_path / "missing").exists()


def test_a_shard_run_without_a_tokenizer_says_what_export_needs():
    """No --tokenizer can match a recorded vocab-N; the message used to say the file was missing."""
    cfg = {"data": {"tokenizer_path": None, "cache_dir": "/nowhere", "vocab_size": 64}}
    with pytest.raises(ExportError, match=r"recorded only its vocabulary size \(vocab-64\).*data.tokenizer_path="):
        find_tokenizer(cfg, {"data": "abc", "tokenizer": "vocab-64"}, None)


def test_malformed_yaml_in_a_user_config_directory_is_one_paragraph(tmp_path):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "bad.yaml").write_text("train:\n  max_steps: [1, 2\n")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    r = subprocess.run([sys.executable, "-m", "msgrun", "--config-dir", str(tmp_path / "conf"), "experiment=bad",
                        "logger=none", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("msgrun: error: ") and "bad.yaml" in r.stderr and "Traceback" not in r.stderr
    assert not Path(tmp_path / "run").exists()
