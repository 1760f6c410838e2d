"""Every `key=value` setting the README and docs/ show is accepted by msgrun: composed through
Hydra with the shipped config tree and passed through check_config. (optim.decay=wsd was
documented in four places and refused by every run that asked for it.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from msgrun.config import check_config

from conftest import compose_cfg

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "sweep")
KEYS = ("model", "schedule", "operator", "data", "optim", "train", "logger", "objective", "eval")
# a value in brackets or braces is taken whole; otherwise up to the first space, quote or comma
# (a sweep's `a,b` lists choices: each is checked)
SETTING = re.compile(r"(?<![\w./$-])(\+?(?:%s)(?:\.[A-Za-z_0-9]+)*)=(\[[^\]\n]*\]|\{[^}\n]*\}|[^\s`'\",)]+(?:,[^\s`'\",)]+)*)"
                     % "|".join(sorted(set(KEYS) | set(GROUPS))))
PLACEHOLDER = re.compile(r"<|>|…|\.\.\.|\$|^\[$|RUN_DIR|PATH")
# shown in the docs on purpose though msgrun refuses them: files a user writes (not shipped), and
# misspellings that demonstrate the refusal
NOT_SETTINGS = {"model=gpt_narrow", "experiment=mgs"}
# settings that are only read beside another (protocol.check refuses them alone): checked with it
COMPANIONS = {"protocol.frontier": "protocol=matched"}


def documented_settings() -> dict[str, str]:
    """override -> the file that shows it (placeholders such as `train.max_flops=<each arm's>` skipped)."""
    found = {}
    for doc in DOCS:
        for m in SETTING.finditer(doc.read_text()):
            # the shell expands $HOME; it leaves a `~` after `key=` alone, which Hydra's grammar refuses
            key, value = m.group(1), m.group(2).replace("$HOME", "/home/user")
            if "." not in key.lstrip("+") and key not in GROUPS:
                continue
            if PLACEHOLDER.search(value):
                continue
            values = [value] if value[0] in "[{" else value.split(",")
            for v in values:
                v = v.rstrip(":.")  # prose punctuation after an inline setting
                if f"{key}={v}" not in NOT_SETTINGS:
                    found.setdefault(f"{key}={v}", doc.relative_to(ROOT).as_posix())
    return found


SETTINGS = documented_settings()


def test_the_walk_finds_the_documented_settings():
    # the walk itself must not silently find nothing (a changed regex or moved docs)
    assert len(SETTINGS) > 50
    assert "optim.decay=wsd" in SETTINGS and "operator=msg" in SETTINGS


def batches(settings: list[str]) -> list[list[str]]:
    """The settings in as few compositions as can hold them: at most one value per key in each
    (composing is the slow part; check_config names the key it refuses). A setting with a
    companion is checked in a composition of its own, beside it."""
    out: list[list[str]] = []
    for setting in settings:
        key = setting.split("=", 1)[0].lstrip("+")
        if key in COMPANIONS:
            out.append([setting, COMPANIONS[key]])
            continue
        for batch in out:
            if all(s.split("=", 1)[0].lstrip("+") != key for s in batch):
                batch.append(setting)
                break
        else:
            out.append([setting])
    return out


@pytest.mark.parametrize("overrides", batches(sorted(SETTINGS)), ids=lambda b: f"{len(b)}:{b[0]}")
def test_documented_settings_are_accepted(overrides, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # logger.wandb.mode=online needs a key, not a server
    cfg = compose_cfg(overrides, str(tmp_path))
    check_config(cfg)
