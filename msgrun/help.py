"""The `--help` pages of msgrun and msgrun-prepare (Hydra's stock page lists ~130 keys without a
word on what they do, and every group, used or not).

The option lists are read from the shipped config tree (msgrun.conf), the same files Hydra
composes, so a new config file shows up here without an edit.
"""

from __future__ import annotations

import sys
import textwrap
from importlib.resources import files

def group_options(group: str) -> list[str]:
    """The options of one config group of the shipped tree (conf/<group>/*.yaml)."""
    folder = files("msgrun.conf").joinpath(group)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def config_groups() -> list[str]:
    return sorted(p.name for p in files("msgrun.conf").iterdir() if p.is_dir() and not p.name.startswith("_"))


def _options_block(options: list[str], indent: int = 6) -> str:
    return textwrap.fill(", ".join(options), width=100, initial_indent=" " * indent, subsequent_indent=" " * indent)


# what each group chooses, in the order a newcomer meets them; a group missing here is still listed
GROUP_PURPOSE = {
    "model": "the final architecture, the size the model has at the end of training",
    "schedule": "which dimensions grow, when, and to which sizes (none: the from-scratch baseline)",
    "operator": "how a growth step builds the larger model from the smaller one",
    "data": "the training text or token shards",
    "optim": "the optimizer and learning-rate schedule",
    "logger": "wandb (offline by default) or none",
    "eval": "downstream evaluation after training (perplexity, lm-evaluation-harness)",
    "experiment": "a ready operator + schedule pair (experiment=msg)",
    "sweep": "a ready multirun, used with -m (msgrun -m sweep=schedule_ablation)",
}

MSGRUN_EXAMPLES = """\
  msgrun                                          the default job: gpt_tiny from scratch, minutes on a CPU
  msgrun schedule=depth_first operator=msg        one growth run (MSG grows depth, then width)
  msgrun experiment=gstack train.max_steps=400    a ready operator + schedule pair, a shorter budget
  msgrun -m schedule=none,depth_first operator=msg train.seed=0,1
                                                  a sweep (multirun/<date>/<time>/<job>)
  msgrun-report multirun/<date>/<time>            its curves and speed-up table
  msgrun --cfg job schedule=width_first           print the composed configuration; train nothing
  msgrun hydra.run.dir=runs/a ...                 choose the run directory (rerun the same command to resume)"""


def msgrun_help() -> str:
    choices = []
    for group in ("model", "schedule", "operator"):
        choices += [f"  {group + '=OPTION':<20}{GROUP_PURPOSE[group]}", _options_block(group_options(group))]
    others = []
    for group in [g for g in GROUP_PURPOSE if g not in ("model", "schedule", "operator")] + \
            [g for g in config_groups() if g not in GROUP_PURPOSE]:
        others += [f"  {group + '=OPTION':<20}{GROUP_PURPOSE.get(group, '')}".rstrip(), _options_block(group_options(group))]
    return f"""\
usage: msgrun [GROUP=OPTION ...] [KEY=VALUE ...] [-m] [--cfg job] [hydra.run.dir=DIR]

Pre-trains a Transformer language model that starts small and grows while it trains (progressive
growth: MSG, bert2BERT, G_stack, CompoundGrowth, RaPTr, LiGO, LEMON, ...), or from scratch as the
baseline. Every run logs loss against cumulative training FLOPs and wall-clock: metrics.jsonl,
growth.jsonl and summary.json in its run directory (default outputs/<date>/<time>/), and wandb
(offline unless logger.wandb.mode=online; logger=none turns it off).

A run is three choices:
{chr(10).join(choices)}

Other config groups:
{chr(10).join(others)}

Examples:
{MSGRUN_EXAMPLES}

Keys (KEY=VALUE, e.g. train.max_steps=400 model.layers=6): every key is typed in msgrun/config.py; a
misspelled key or option, a wrong type or an impossible schedule is refused (exit 2) before anything
runs. The keys and options are described in docs/configuration.md, sweeps and the report in
docs/sweeps.md, resuming in docs/resuming.md, data in docs/data.md, export and evaluation in
docs/export.md. `msgrun --hydra-help` shows Hydra's own flags (-m, --cfg, --config-dir, ...).
"""


def prepare_help() -> str:
    from msgrun.data.sources import SOURCES  # the text sources prepare accepts (data=shards already is shards)

    return f"""\
usage: msgrun-prepare data=OPTION [data.KEY=VALUE ...] out_dir=DIR [shard_tokens=N] [batch_bytes=N]
                      [progress=auto|rich|plain]

Tokenizes a text source once, in parallel, into token shards on disk (train_*.bin and val_*.bin, a
tokenizer.json and a manifest.json in out_dir) that `msgrun data=shards` reads by memory map. It
composes the same data group as msgrun, so a corpus prepared here is split and tokenized as msgrun
would read it directly. Nothing is written before the input is checked (bad input: exit 2).

data=OPTION   the text source (only the data group is used here)
{_options_block([o for o in group_options("data") if o in SOURCES])}

Keys:
  out_dir=DIR          where the shards, tokenizer.json and manifest.json go (required; created if need
                       be, an unfinished one is resumed, a finished one left as it is)
  shard_tokens=N       tokens per shard; a shard ends at the first document boundary past N (default 100_000_000)
  batch_bytes=N        text per tokenizer batch, what the tokenizers library spreads over the cores (default 1_000_000)
  progress=MODE        auto (a progress bar on a terminal), rich or plain
  data.*               the data group's keys (data.paths, data.hf_path, data.tokenizer_path, data.vocab_size, ...)

Examples:
  msgrun-prepare data=pysite out_dir=/data/pysite
  msgrun-prepare data=files 'data.paths=[~/corpus/**/*.txt]' out_dir=/data/mine
  msgrun-prepare data=hf data.hf_path=json 'data.hf_data_files=[corpus/*.jsonl]' data.hf_streaming=true \\
      data.tokenizer_path=gpt2/tokenizer.json out_dir=/data/corpus shard_tokens=100_000_000
  msgrun data=shards data.train='/data/pysite/train_*.bin' data.val='/data/pysite/val_*.bin' \\
      data.tokenizer_path=/data/pysite/tokenizer.json      then train on it (prepare prints this command)

The data keys are described in docs/data.md.
"""


def print_help_if_asked(page) -> None:
    """Print `page()` and exit 0 when -h/--help is among the arguments (before Hydra sees them)."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(page())
        sys.exit(0)
