"""Shared fixtures: Hydra composition of the real config tree, and a small real corpus.

End-to-end tests compose the shipped config through Hydra's compose API with a few overrides
(a few standard-library files, small batches), so they exercise the same code path as `msgrun`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from msgrun.config import register_configs

FAST = [
    "logger=none",
    "logger.console=plain",
    "data.max_docs=120",
    "data.vocab_size=512",
    "train.batch_size=8",
    "train.eval_tokens=4096",
    "train.log_every=5",
    "train.eval_every=10",
    "optim.warmup_steps=5",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("msgrun_cache"))


def compose_cfg(overrides: list[str], cache: str | None = None):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("msgrun.conf", version_base="1.3"):
        extra = [f"data.cache_dir={cache}"] if cache else []
        return compose("config", overrides=[*FAST, *extra, *overrides])


@pytest.fixture
def make_cfg(cache_dir):
    def make(*overrides):
        return compose_cfg(list(overrides), cache_dir)

    return make


def perturbed(model, seed: int, scale: float):
    """`model` with every parameter moved by scale * N(0, 1) noise (seeded): non-trivial norm gains,
    biases and larger weights, so that a growth operator's exactness cannot be an accident of the init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


# The slow set (`pytest -m slow`; CI runs it after the default set, which `pytest -q` runs): the
# long end-to-end variants, each measured at 4 s or more on an idle 2-core machine (pytest
# --durations), with one representative of each promise left in the default run (a two-process
# growth, a multirun, the CLI's one-paragraph refusal, checkpoint loading). Listed here, in one
# place, rather than as decorators scattered over the files; README gives both sets' times.
SLOW = {
    "tests/test_bench.py": (
        "test_gpu_goals_report_runs_and_writes_every_table",
        "test_sharded_growth_bench_prints_both_ways_per_rank",
        "test_throughput_script_prints_the_comparison",
    ),
    "tests/test_bench_data.py": (
        "test_data_bench_runs_and_cleans_up",
    ),
    "tests/test_branch.py": (
        "test_a_branch_equals_a_run_given_the_decay_from_the_start",
        "test_a_branch_resumes_from_its_own_checkpoint_like_any_run",
    ),
    "tests/test_cli.py": (
        "test_a_crash_before_training_leaves_no_record_for_a_later_command",
        "test_a_dead_holders_lock_file_does_not_block_and_a_run_leaves_none",
        "test_a_sweep_job_whose_directory_is_in_use_is_refused_and_counted_as_failed",
        "test_bad_input_catalogue[broken tokenizer]",
        "test_bad_input_catalogue[dangling symlink]",
        "test_bad_input_catalogue[empty corpus]",
        "test_bad_input_catalogue[empty directory]",
        "test_bad_input_catalogue[impossible shape]",
        "test_bad_input_catalogue[negative checkpoint interval]",
        "test_bad_input_catalogue[negative time budget]",
        "test_bad_input_catalogue[one beta]",
        "test_bad_input_catalogue[shrinking stage]",
        "test_bad_input_catalogue[stage after the end]",
        "test_bad_input_catalogue[stage overlapping a ramp]",
        "test_bad_input_catalogue[unsupported dimension]",
        "test_bad_input_catalogue[wandb online without a key]",
        "test_binary_corpus_and_small_tokenizer_are_warned_about",
        "test_ctrl_c_twice_during_training_is_one_paragraph",
        "test_finished_and_different_runs_are_never_overwritten",
        "test_full_error_shows_the_traceback",
        "test_missing_data_path",
        "test_refusal_never_removes_a_directory_it_did_not_create",
        "test_refusal_removes_the_directories_it_created",
    ),
    "tests/test_distributed.py": (
        "test_resume_at_the_same_world_size[ddp]",
        "test_resume_at_the_same_world_size[fsdp]",
        "test_two_processes_match_one[ddp]",
        "test_two_processes_match_one[fsdp-compiled]",
        "test_two_processes_match_one[fsdp]",
    ),
    "tests/test_distributed_arch.py": (
        "test_grouped_heads_and_upcycling_grow_across_two_processes[fsdp]",
    ),
    "tests/test_eval.py": (
        "test_bad_eval_config_is_refused_before_training",
        "test_cli_refuses_lm_eval_on_bert_with_exit_code_2",
        "test_evaluation_leaves_training_untouched",
        "test_example_task_runs_offline_and_lands_in_summary",
        "test_two_processes_evaluate_like_one[ddp]",
        "test_two_processes_evaluate_like_one[fsdp]",
    ),
    "tests/test_export.py": (
        "test_cli_refuses_bad_input_with_exit_code_2",
    ),
    "tests/test_gpu.py": (
        "test_compiled_training_recompiles_once_per_phase_not_per_step[cpu]",
    ),
    "tests/test_install.py": (
        "test_a_user_config_folder_joins_the_tree_through_hydra_searchpath",
        "test_wheel_installs_and_runs_a_job_a_sweep_and_the_report_outside_the_repository",
    ),
    "tests/test_reproductions.py": (
        "test_every_reproduction_sweep_runs_end_to_end_at_a_tiny_budget",
    ),
    "tests/test_preemption.py": (
        "test_a_stopped_run_prints_the_exact_command_that_resumes_it",
        "test_a_stopped_sweep_rerun_resumes_its_unfinished_job_and_skips_the_finished_one",
    ),
    "tests/test_moe.py": (
        "test_expert_duplication_runs_exactly",
    ),
    "tests/test_preflight.py": (
        "test_preflight_leaves_the_run_unchanged",
    ),
    "tests/test_protocol.py": (
        "test_one_multirun_gives_arms_their_matched_baselines_and_a_frontier",
        "test_protocol_matched_trains_arms_and_their_baselines_in_one_multirun",
        "test_the_printed_command_run_as_printed_gives_matched_baselines",
    ),
    "tests/test_resume.py": (
        "test_a_damaged_checkpoint_is_skipped_for_the_previous_one[replace_keeping_the_sidecar-does not load]",
        "test_a_damaged_checkpoint_is_skipped_for_the_previous_one[truncate-corrupt]",
        "test_a_failed_checkpoint_write_is_one_paragraph_and_keeps_the_previous_ones",
        "test_killed_and_resumed_run_equals_uninterrupted[msg-kill_steps0]",
        "test_killed_and_resumed_run_equals_uninterrupted[raptr-kill_steps1]",
        "test_signals_stop_with_a_checkpoint_and_the_rerun_equals_an_uninterrupted_run",
    ),
    "tests/test_resume_new_operators.py": (
        "test_killed_and_resumed_run_equals_uninterrupted[lemon]",
        "test_killed_and_resumed_run_equals_uninterrupted[ligo]",
        "test_killed_and_resumed_run_equals_uninterrupted[llama_pro]",
        "test_killed_and_resumed_run_equals_uninterrupted[midas]",
        "test_killed_and_resumed_run_equals_uninterrupted[solar]",
    ),
    "tests/test_schedule.py": (
        "test_gstack_with_a_non_integer_start_depth_exits_with_code_2",
    ),
    "tests/test_sharded_checkpoint.py": (
        "test_export_from_a_two_rank_sharded_checkpoint",
        "test_resume_at_another_world_size_mid_ramp[1to2]",
        "test_resume_at_another_world_size_mid_ramp[2to1-fsdp]",
        "test_resume_at_another_world_size_mid_ramp[2to1]",
        "test_resume_at_another_world_size_mid_ramp[2to2]",
    ),
    "tests/test_sharded_growth.py": (
        "test_a_method_that_rewrites_the_whole_model_says_why_it_gathers",
        "test_sharded_growth_equals_single_process_growth[bert2bert-width]",
        "test_sharded_growth_equals_single_process_growth[llama_pro-layers]",
        "test_sharded_growth_equals_single_process_growth[msg-ffn]",
        "test_sharded_growth_equals_single_process_growth[msg-heads]",
        "test_sharded_growth_equals_single_process_growth[msg-hidden]",
        "test_sharded_growth_equals_single_process_growth[msg-layers]",
    ),
    "tests/test_shards.py": (
        "test_cli_empty_glob_is_one_paragraph_exit_2",
    ),
    "tests/test_sweeps.py": (
        "test_a_failing_job_does_not_stop_the_sweep[joblib]",
        "test_optuna_search_minimises_flops_to_target",
        "test_two_job_multirun_and_its_report",
    ),
    "tests/test_wandb.py": (
        "test_one_wandb_run_across_a_kill_a_preemption_and_resumes",
    ),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path, _, name = item.nodeid.partition("::")
        if name in SLOW.get(path, ()):
            item.add_marker(pytest.mark.slow)
