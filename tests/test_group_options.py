"""A misspelled option of any config group is refused before anything runs: exit 2 and the list
of valid options (an `optional` group used to compose without the typo'd option, silently)."""

import sys
from importlib.resources import files

import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra

from msgrun.cli import main

CONF = files("msgrun.conf")
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_"))


def options(group):
    return sorted(p.name.removesuffix(".yaml") for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))


def run_msgrun(monkeypatch, capsys, tmp_path, *args):
    """`msgrun ARGS --cfg job` in this process: composes (and refuses) exactly as the command does,
    and prints the config instead of training should a typo ever be accepted again."""
    monkeypatch.setattr(sys, "argv", ["msgrun", *args, f"hydra.run.dir={tmp_path}/run", "--cfg", "job"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    GlobalHydra.instance().clear()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err


def test_every_group_is_covered():
    assert {"model", "schedule", "operator", "data", "optim", "logger", "eval", "experiment", "sweep"} <= set(GROUPS)


@pytest.mark.parametrize("group", [*GROUPS, "hydra/launcher", "hydra/sweeper"])
def test_misspelled_group_option_is_refused_with_the_valid_options(monkeypatch, capsys, tmp_path, group):
    valid = options(group) if group in GROUPS else ["basic"]
    code, err = run_msgrun(monkeypatch, capsys, tmp_path, f"{group}={valid[0]}_typo")
    assert code == 2, err
    assert err.startswith("msgrun: error: ") and "Traceback" not in err, err
    assert f"{group}/{valid[0]}_typo" in err, err
    for option in valid:
        assert option in err, (option, err)
    assert not (tmp_path / "run").exists()


def test_a_valid_optional_group_option_still_composes(monkeypatch, capsys, tmp_path):
    code, err = run_msgrun(monkeypatch, capsys, tmp_path, "experiment=msg")
    assert code == 0, err


def test_a_launcher_whose_extra_is_missing_names_the_extra(monkeypatch, capsys, tmp_path):
    import hydra_plugins.hydra_joblib_launcher.config  # noqa: F401  (registered now, so not re-added below)

    # as if hydra-joblib-launcher were not installed: its option is absent from Hydra's store
    monkeypatch.delitem(ConfigStore.instance().repo["hydra"]["launcher"], "joblib.yaml")
    code, err = run_msgrun(monkeypatch, capsys, tmp_path, "hydra/launcher=joblib")
    assert code == 2, err
    assert "hydra-joblib-launcher" in err and "pip install -e '.[sweep]'" in err, err


def test_install_hints_name_the_extra_pyproject_defines():
    from msgrun.extras import install_hint

    assert install_hint("lm-eval") == install_hint("transformers") == "pip install -e '.[eval]' in the msgrun checkout"
    assert "'.[hf]'" in install_hint("datasets")  # the first extra that needs it, never `test`
    assert "'.[sweep]'" in install_hint("hydra_optuna_sweeper")  # names compare as pip normalises them


def test_a_new_entry_of_a_mapping_without_its_plus_says_to_add_the_plus(monkeypatch, capsys, tmp_path):
    code, err = run_msgrun(monkeypatch, capsys, tmp_path, "eval=example",
                           "eval.perplexity.mytext={name: files, paths: ['a.txt']}")
    assert code == 2, err
    assert "add one with a leading +, as +eval.perplexity.mytext=..." in err, err
