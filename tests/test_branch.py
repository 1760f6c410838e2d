"""WSD decay branches (train.branch_from): a branch of a constant-LR run equals a run given its
budget from the start, bit for bit; its FLOPs and tokens include the parent's."""

import json

import pytest

from conftest import read_jsonl
from msgrun.config import check_config
from msgrun.errors import ConfigError
from msgrun.train import Trainer

EXACT = ("step", "tokens", "flops", "loss", "lr", "val_loss", "val_bpb")
WSD = ["optim.decay=wsd", "optim.decay_fraction=0.2", "train.log_every=5", "train.eval_every=5",
       "train.checkpoint_every=10", "train.keep_checkpoints=10", "model.layers=2", "model.hidden=32",
       "model.heads=2", "model.head_dim=16", "model.ffn=64", "model.seq_len=32", "train.batch_size=4"]


def train(make_cfg, run_dir, *overrides):
    Trainer(make_cfg(*WSD, *overrides), run_dir).run()
    return read_jsonl(run_dir / "metrics.jsonl"), json.loads((run_dir / "summary.json").read_text())


def exact(lines):
    return [{k: line.get(k) for k in EXACT} for line in lines]


def test_wsd_is_a_valid_choice_on_the_command_line(make_cfg):
    check_config(make_cfg(*WSD))  # what `msgrun optim.decay=wsd` runs before anything else


def test_a_branch_equals_a_run_given_the_decay_from_the_start(make_cfg, tmp_path):
    parent, _ = train(make_cfg, tmp_path / "parent", "train.max_steps=40")  # decays from step 32
    direct, direct_summary = train(make_cfg, tmp_path / "direct", "train.max_steps=25")  # decays from step 20
    branch, summary = train(make_cfg, tmp_path / "branch", "train.max_steps=25",
                            f"train.branch_from={tmp_path / 'parent'}")
    assert summary["branch_from"]["step"] == 20 and summary["branch_from"]["run_dir"] == str(tmp_path / "parent")
    # up to the branch point the parent and the direct run are the same run (the LR is at its peak)
    assert exact(parent)[:4] == exact(direct)[:4]
    assert exact(branch) == exact(direct)  # every line, the parent's copied ones and the branch's own
    assert (summary["flops"], summary["tokens"], summary["final_val_loss"]) == (
        direct_summary["flops"], direct_summary["tokens"], direct_summary["final_val_loss"])


def test_a_branch_needs_wsd_and_the_parents_settings_and_refuses_before_any_compute(make_cfg, tmp_path,
                                                                                   monkeypatch):
    """Each refusal comes before the memory pre-flight (a growth replay and a training step) and
    before the run directory is created."""
    import msgrun.train

    train(make_cfg, tmp_path / "parent", "train.max_steps=20")
    monkeypatch.setattr(msgrun.train, "run_preflight",
                        lambda *a, **k: pytest.fail("the pre-flight ran before the branch was checked"))
    for name, overrides, refusal in (
            ("a", ["optim.decay=cosine"], "needs optim.decay=wsd"),
            ("b", ["train.max_steps=15", "optim.weight_decay=0.01"],
             r"differs from this run outside the budget in optim.weight_decay"),
            ("c", ["train.max_steps=5"], "no checkpoint there lies before both")):
        with pytest.raises(ConfigError, match=refusal):
            Trainer(make_cfg(*WSD, *overrides, f"train.branch_from={tmp_path / 'parent'}"), tmp_path / name).run()
        assert not (tmp_path / name).exists()


def test_a_branch_resumes_from_its_own_checkpoint_like_any_run(make_cfg, tmp_path, monkeypatch):
    """Stopped mid-branch (a crash after its checkpoint at step 24, with step 25 logged), the branch
    resumes from its own checkpoint, without its parent, and logs what the uninterrupted branch logs."""
    import shutil

    train(make_cfg, tmp_path / "parent", "train.max_steps=40")  # checkpoints every 10 steps
    own = ["train.max_steps=30", "train.checkpoint_every=3", f"train.branch_from={tmp_path / 'parent'}"]
    whole, whole_summary = train(make_cfg, tmp_path / "whole", *own)  # branches at step 20, decays from 24
    step = Trainer.train_step

    def crash_after_step_26(self):
        if self.step == 26:
            raise RuntimeError("killed")
        step(self)

    monkeypatch.setattr(Trainer, "train_step", crash_after_step_26)
    with pytest.raises(RuntimeError, match="killed"):
        train(make_cfg, tmp_path / "branch", *own)
    monkeypatch.undo()
    assert read_jsonl(tmp_path / "branch" / "metrics.jsonl")[-1]["step"] == 25  # logged after the checkpoint
    shutil.rmtree(tmp_path / "parent")  # a resumed branch reads its own checkpoint and record only
    resumed, summary = train(make_cfg, tmp_path / "branch", *own)
    assert exact(resumed) == exact(whole)
    assert summary["branch_from"] == whole_summary["branch_from"] and summary["branch_from"]["step"] == 20
    assert (summary["flops"], summary["tokens"], summary["final_val_loss"]) == (
        whole_summary["flops"], whole_summary["tokens"], whole_summary["final_val_loss"])
