"""`msgrun-prepare`: a text source of the `data` config group into token shards on disk.

    msgrun-prepare data=hf data.hf_path=json 'data.hf_data_files=[corpus/*.jsonl]' data.hf_streaming=true \\
        data.tokenizer_path=gpt2/tokenizer.json out_dir=/data/corpus shard_tokens=100_000_000

It composes the same `data` group as `msgrun` (conf/data/*.yaml), so a corpus prepared here and
one read directly are split and tokenized alike; the work is msgrun/data/prepare.py. Bad input
ends in one paragraph and exit code 2 before anything is written.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from msgrun.config import DataConfig, check_section
from msgrun.errors import MsgrunError

PROGRESS = ("auto", "rich", "plain")


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    out_dir: Optional[str] = None  # where the shards, tokenizer.json and manifest.json go
    shard_tokens: int = 100_000_000  # tokens per shard (a shard ends at the first document boundary past it)
    batch_bytes: int = 1_000_000  # text per tokenizer batch: what the tokenizers library spreads over all cores
    progress: str = "auto"  # one of PROGRESS: auto (a rich progress bar on a terminal) | rich | plain


@hydra.main(version_base="1.3", config_path="pkg://msgrun.conf", config_name="prepare")
def hydra_entry(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


def run(cfg) -> int:
    """Prepare as cfg says; the exit code (2: bad input, 130: Ctrl-C), every failure one paragraph."""
    from msgrun.data.prepare import prepare_shards

    try:
        if cfg.progress not in PROGRESS:
            raise MsgrunError(f"progress = {cfg.progress!r} is not a valid choice; choose one of {', '.join(PROGRESS)}.")
        check_section(cfg, "data")  # msgrun's own rules for the data keys, before any work
        bar = sys.stderr.isatty() if cfg.progress == "auto" else cfg.progress == "rich"
        prepare_shards(cfg.data, cfg.out_dir, cfg.shard_tokens, cfg.batch_bytes, progress=bar)
    except MsgrunError as e:
        print(f"msgrun-prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"msgrun-prepare: error: stopped by Ctrl-C. The shards finished so far are recorded in "
              f"{cfg.out_dir}/progress.json: rerun the same command to resume after them.", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def main() -> None:
    from msgrun.cli import report_composition_errors
    from msgrun.help import prepare_help, print_help_if_asked

    print_help_if_asked(prepare_help)
    ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)
    report_composition_errors("msgrun-prepare")  # a misspelled key: one paragraph, exit 2
    hydra_entry()


if __name__ == "__main__":
    main()
