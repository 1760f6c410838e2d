"""The help pages: msgrun's own (not Hydra's stock page), and those of prepare, report and export."""

import subprocess
import sys
from pathlib import Path

import pytest

from msgrun import help as msgrun_help

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def page(monkeypatch, capsys, main, *args):
    monkeypatch.setattr(sys, "argv", ["prog", *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    return capsys.readouterr().out


def docs_named(text):
    import re

    return set(re.findall(r"docs/[a-z_]+\.md", text))


def test_msgrun_help_says_what_it_does_with_the_three_choices_and_their_options(monkeypatch, capsys):
    from msgrun.cli import main

    out = page(monkeypatch, capsys, main, "--help")
    assert "powered by Hydra" not in out and "grows while it trains" in out
    flat = " ".join(out.split())
    for group in ("model", "schedule", "operator", "experiment", "sweep", "data", "eval"):
        assert f"{group}=OPTION" in out
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            assert option in flat, (group, option)
    assert "msgrun schedule=depth_first operator=msg" in out and "msgrun -m " in out
    assert page(monkeypatch, capsys, main, "model=gpt_small", "-h") == out


def test_prepare_help_lists_only_what_prepare_uses(monkeypatch, capsys):
    from msgrun.prepare import main

    out = page(monkeypatch, capsys, main, "--help")
    assert "out_dir=DIR" in out and "shard_tokens" in out and "pystdlib" in out
    assert "schedule" not in out and "operator" not in out and "model=" not in out


def test_report_and_export_help_have_examples_and_a_plain_percent():
    for prog in ("msgrun.report", "msgrun.export"):
        out = subprocess.run([sys.executable, "-m", prog, "--help"], capture_output=True, text=True, check=True).stdout
        assert "examples:" in out, prog
        assert "%%" not in out, prog
    report = subprocess.run([sys.executable, "-m", "msgrun.report", "--help"], capture_output=True, text=True).stdout
    assert "95% confidence" in report


def test_every_docs_page_a_help_page_names_exists(monkeypatch, capsys):
    import msgrun.report.cli

    texts = [msgrun_help.msgrun_help(), msgrun_help.prepare_help(), msgrun.report.cli.build_parser().format_help()]
    named = set().union(*map(docs_named, texts))
    assert named
    for doc in named:
        assert (ROOT / doc).is_file(), doc
