"""Loads the task's JSON lines from this folder (lm-eval resolves `!function loader.load` here)."""

from pathlib import Path


def load(**_):
    import datasets

    path = Path(__file__).with_name("msgrun_pycode.jsonl")
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(path))})
