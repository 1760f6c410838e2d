"""The GPU path (CUDA, bf16 autocast, per-unit torch.compile) on first contact, and the same
compile properties on the CPU.

Tests taking `device` run twice: "cpu" everywhere (CI), "cuda" only where CUDA is (marked `gpu`:
`pytest -m gpu` selects them; without CUDA they are skipped). Whether a step recompiles is
decided by Dynamo's guards, before any backend runs, so the CPU case counts recompiles with
Dynamo's "eager" backend (it captures the graphs and runs them as captured: a fraction of
Inductor's compile time); the CUDA case runs Inductor and bf16, the real thing. Compiles are counted with Dynamo's counters (frames compiled: a first compile or
a recompile, i.e. a call that missed every cached graph).
"""

import contextlib
import functools
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from msgrun import checkpoint
from msgrun.growth.masks import install_masks
from msgrun.growth.schedule import Shape
from msgrun.train import Trainer

from conftest import read_jsonl
from test_growth_msg import BASE, FAMILIES, GROWTHS, final_args, logits, msg_operator, small_model

HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")])
DEVICES = ["cpu", CUDA]
REAL_COMPILE = torch.compile

# gpt_tiny's family at a small shape; sequence length 32 keeps the CPU cases to seconds
SMALL = ["model.layers=4", "model.hidden=64", "model.heads=2", "model.ffn=128", "model.seq_len=32",
         "train.log_every=1"]


@pytest.fixture
def compiled_on(monkeypatch):
    """Overrides for a compiled run on `device`, with a fresh compile cache and counters."""

    def use(device: str) -> list[str]:
        torch._dynamo.reset()
        counters.clear()
        # past the recompile limit a unit silently runs eagerly: make that an error here. Through
        # the config's own patch(), not monkeypatch: inside the full suite hasattr() on this config
        # module was seen to answer False for a key that exists
        try:
            patches.enter_context(torch._dynamo.config.patch(fail_on_recompile_limit_hit=True))
        except AttributeError:  # torch < 2.7 names it after the cache
            patches.enter_context(torch._dynamo.config.patch(fail_on_cache_limit_hit=True))
        if device == "cpu":  # the same guards, hence the same recompiles, as Inductor
            monkeypatch.setattr(torch, "compile", functools.partial(REAL_COMPILE, backend="eager"))
        return [f"train.device={device}", "train.compile=true"]

    with contextlib.ExitStack() as patches:
        yield use
    torch._dynamo.reset()


def compiles_per_step(trainer: Trainer) -> list[tuple[int, int, tuple | None]]:
    """Record (step, frames compiled during it, RaPTr's path) for every training step of
    `trainer.run()` (evaluations between steps compile too; they are not counted here)."""
    log = []
    step = trainer.train_step

    def counted():
        path, _ = trainer.engine.path_for_step(trainer.step)  # a pure function of the step
        before = counters["frames"]["ok"]
        step()
        log.append((trainer.step, counters["frames"]["ok"] - before, None if path is None else tuple(path)))

    trainer.train_step = counted
    return log


def steps_that_compiled(log) -> list[int]:
    return [step for step, compiled, _ in log if compiled]


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


# ---------------------------------------------------------------------------- MSG on CUDA, fp32 probe
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("arch", FAMILIES.values(), ids=FAMILIES.keys())
@pytest.mark.parametrize("growth", GROWTHS.values(), ids=GROWTHS.keys())
def test_msg_is_function_preserving_on_cuda(arch, growth):
    """test_growth_msg's check with the model, the operator and the masks on the GPU: the probe's
    exact numerics (fp32 without TF32, the math attention kernel) must hold there too."""
    start, target = growth
    cuda = torch.device("cuda")
    model = small_model(arch, start).to(cuda)
    idx = torch.randint(3, 101, (3, 24), generator=torch.Generator().manual_seed(1)).to(cuda)
    positions = torch.tensor([[0, 5, 23]] * 3, device=cuda) if arch["family"] == "bert" else None
    before = logits(model, idx, positions)
    fa = final_args(model, target)
    grown = msg_operator(arch["family"]).grow(model, Shape(fa.layers, fa.hidden, fa.heads, fa.ffn, BASE["seq_len"]),
                                               fa, torch.Generator().manual_seed(7))
    alpha = torch.zeros((), device=cuda)
    install_masks(grown.model, alpha, grown.new_units, grown.new_layers)
    assert next(grown.model.parameters()).is_cuda
    assert (before - logits(grown.model, idx, positions)).abs().max().item() <= 1e-5
    alpha.fill_(1.0)  # and the growth is real
    assert (before - logits(grown.model, idx, positions)).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------- compiled training
def test_compiled_step_runs_the_loss_in_a_compiled_unit_and_leaves_the_logits_in_it(compiled_on, make_cfg, tmp_path):
    """The loss (log-softmax over B*T*V logits, forward and backward) is where per-block
    compiling lost to compiling the whole model (issue 18): the head is a compiled unit of its
    own, and the training step does not take the logits out of it (a compiled unit returning
    them gets a zero-filled logits-sized gradient and a second logits-sized buffer per step)."""
    cfg = make_cfg(*compiled_on("cpu"), *SMALL, "train.max_steps=2")
    trainer = Trainer(cfg, tmp_path)
    trainer._wrap()
    compiled_head = trainer.model.__dict__.get("head")
    assert compiled_head is not None, "the head is not compiled"
    returned = []

    def head(*args, **kwargs):
        out = compiled_head(*args, **kwargs)
        returned.append(out[0])
        return out

    trainer.model.head = head
    trainer.train_step()
    assert returned == [None]
    assert counters["stats"]["unique_graphs"] == 2  # the block graph, shared by all blocks, and the head's


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_recompiles_once_per_phase_not_per_step(device, compiled_on, make_cfg, tmp_path):
    """A compiled run through a depth event and a width event, each followed by an MSG ramp,
    evaluating every other step: every compile happens in the first step of a phase (the start,
    the first step after each event, the first step after each ramp's masks are removed); the
    ramp's alpha, a device tensor updated in place, never recompiles; nothing breaks the graphs;
    no unit falls back to eager at Dynamo's recompile limit; both events keep the function."""
    cfg = make_cfg(*compiled_on(device), *SMALL, "schedule=depth_first", "operator=msg", "operator.ramp_steps=3",
                   "train.max_steps=14", "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=4",
                   "schedule.stages.1.at_fraction=null", "schedule.stages.1.at_step=8", "train.eval_every=2")
    trainer = Trainer(cfg, tmp_path)
    log = compiles_per_step(trainer)
    trainer.run()
    # phases begin at step 1, after the events (steps 4 and 8: steps 5 and 9), after the ramps
    # (the first step after an event trains at alpha 0, alpha reaches 1 three increments later,
    # then the masks go: the depth ramp's end coincides with the width event, the width ramp's
    # first plain step is 13)
    phase_starts = {1, 5, 9, 13}
    compiled_at = steps_that_compiled(log)
    assert compiled_at[0] == 1 and set(compiled_at) <= phase_starts, log
    assert graph_breaks() == 0, dict(counters["graph_break"])
    # in training steps each unit compiles once per variant: blocks and head at the start, the
    # masked new blocks (depth), masked blocks and head at the new width, then plain ones
    assert sum(compiled for _, compiled, _ in log) <= 2 + 1 + 2 + 2, log
    events = read_jsonl(tmp_path / "growth.jsonl")
    assert [e["dims"] for e in events] == [["layers"], ["hidden", "heads", "ffn"]]
    assert all(e["max_abs_logit_diff"] <= 1e-5 for e in events)


@pytest.mark.parametrize("device", DEVICES)
def test_raptr_stage_does_not_recompile_per_path(device, compiled_on, make_cfg, tmp_path):
    """RaPTr draws a new path of blocks every step: each block is its own compiled unit, so a
    path is only a different sequence of calls to cached graphs; only a stage's new scale
    factor (a Python float, specialized) compiles, once per stage."""
    cfg = make_cfg(*compiled_on(device), *SMALL, "model.layers=6", "schedule=raptr_3stage", "operator=raptr",
                   "train.max_steps=18", "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=6",
                   "schedule.stages.1.at_fraction=null", "schedule.stages.1.at_step=12")
    trainer = Trainer(cfg, tmp_path)
    log = compiles_per_step(trainer)
    trainer.run()
    assert len({path for step, _, path in log if step <= 6}) >= 4, log  # the first stage's paths differ
    assert set(steps_that_compiled(log)) <= {1, 7, 13}, log
    assert graph_breaks() == 0, dict(counters["graph_break"])
    assert sum(compiled for _, compiled, _ in log) <= 2 * 3, log  # per stage at most: blocks and head


# ---------------------------------------------------------------------------- pre-flight, resume
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_preflight_reports_peak_memory_on_cuda(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL, "train.device=cuda", "train.preflight=true", "schedule=depth_first", "operator=msg",
                   "operator.ramp_steps=2", "train.max_steps=6")
    summary = Trainer(cfg, tmp_path).run()
    report = summary["preflight"]
    # the allocator's peaks: at least the final model's fp32 weights, gradients and two AdamW moments
    floor = 4 * 4 * summary["params"]
    assert report["step_peak_bytes"] >= floor and report["growth_peak_bytes"] >= floor, report
    assert report["step_peak_bytes"] < torch.cuda.get_device_properties(0).total_memory


@pytest.mark.parametrize("device", [CUDA])  # on the CPU, tests/test_resume.py kills and resumes real runs
def test_resume_reproduces_the_next_losses(device, make_cfg, tmp_path):
    """A run checkpointed at step 5 (in an MSG ramp, with dropout) and resumed there (the newer
    checkpoints removed) logs the same next 5 losses as the run that went on, through the
    second growth event: model, masks, optimizer, data position and RNG come back. bf16
    autocast on CUDA: the same kernels on the same inputs give the same bits."""
    overrides = [*SMALL, f"train.device={device}", "schedule=depth_first", "operator=msg", "operator.ramp_steps=3",
                 "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=3",
                 "schedule.stages.1.at_fraction=null", "schedule.stages.1.at_step=7", "train.max_steps=10",
                 "train.checkpoint_every=5", "train.keep_checkpoints=5", "model.dropout=0.1"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    Trainer(make_cfg(*overrides), whole).run()
    shutil.copytree(whole, resumed)
    # checkpoints: every 5 steps, after each growth event (steps 3 and 7) and at the end
    later = [p for p in checkpoint.list_checkpoints(resumed) if int(p.stem.split("_")[-1]) > 5]
    assert len(later) == 2, checkpoint.list_checkpoints(resumed)
    for p in later:
        p.unlink()
    (resumed / "summary.json").unlink()
    Trainer(make_cfg(*overrides), resumed).run()
    losses = {name: [(m["step"], m["loss"]) for m in read_jsonl(d / "metrics.jsonl") if m["step"] > 5]
              for name, d in (("whole", whole), ("resumed", resumed))}
    assert [s for s, _ in losses["resumed"]] == [6, 7, 8, 9, 10]
    # bitwise is expected; the tolerance tells a nondeterministic CUDA kernel (tiny differences)
    # apart from a resume bug (differences at the size of a training step's change)
    assert [loss for _, loss in losses["resumed"]] == pytest.approx([loss for _, loss in losses["whole"]], rel=1e-5)
