"""Sharded (torch.distributed.checkpoint) checkpoints under train.distributed=fsdp: atomic writes,
validation against DCP's metadata, and resume at another world size and in another mode."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from msgrun import checkpoint
from msgrun.distributed import Dist

from conftest import read_jsonl
from test_distributed import RUN, run

# A checkpoint every 5 steps: step 10 is inside the MSG ramp of the event at step 9 (alpha 1/3).
RESUMABLE = [*RUN, "train.checkpoint_every=5", "train.keep_checkpoints=10"]
RESUME_AT = 10
# The same global batch and tokens; another world size only reorders floating-point reductions.
RELATIVE = 1e-5


def torchrun(n):
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe, "--standalone", f"--nproc_per_node={n}", "-m", "msgrun"]


def launch(ranks, mode):
    """The command that trains with `ranks` processes in `mode` (0: a plain single process)."""
    return ([sys.executable, "-m", "msgrun"] if ranks == 0 else torchrun(ranks)) + [*RESUMABLE,
                                                                                  f"train.distributed={mode}"]


# ------------------------------------------------------------------ helpers for in-process checks

def tiny_model():
    from msgrun.model import ModelArgs, Transformer

    torch.manual_seed(0)
    return Transformer(ModelArgs(vocab_size=64, layers=2, hidden=32, heads=2, head_dim=16, ffn=64, max_seq_len=16))


def trainer_state(model, step):
    """What Trainer.state_dict gives, at the minimum checkpoint.open_checkpoint asks for."""
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    optim = {name: dict(opt.state[p]) for name, p in model.named_parameters()}
    state = {"model_args": dict(vars(model.args)), "counters": {"step": step},
             "optimizer_keys": {n: list(e) for n, e in optim.items()}}
    return state, {"model": model.state_dict(), "optimizer": optim}


def restored(state):
    from msgrun.model import ModelArgs, Transformer

    model = Transformer(ModelArgs(**state["model_args"]))
    for p in model.parameters():
        p.data.zero_()
    checkpoint.restore_tensors(state, {"model": model.state_dict()})
    return model


def test_a_sharded_checkpoint_restores_and_a_truncated_shard_is_skipped(tmp_path):
    model = tiny_model()
    for step in (1, 2):
        state, tensors = trainer_state(model, step)
        checkpoint.save_sharded(tmp_path, step, state, tensors, keep=5, dist=Dist())
    paths = checkpoint.list_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["step_000000001.dcp", "step_000000002.dcp"]
    path, state = checkpoint.newest_loadable(tmp_path)
    assert path == paths[1] and state["sharded"] == str(paths[1])
    back = restored(state)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))

    shard = next(paths[1].glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    warnings = []
    path, _ = checkpoint.newest_loadable(tmp_path, warn=warnings.append)
    assert path == paths[0]
    assert "truncated shard file" in warnings[0] and shard.name in warnings[0]


KILLED_WRITE = """
import os, signal, sys
import torch
import torch.distributed.checkpoint.filesystem as fs
sys.path.insert(0, {tests!r})
from test_sharded_checkpoint import tiny_model, trainer_state
from msgrun import checkpoint
from msgrun.distributed import Dist

model = tiny_model()
state, tensors = trainer_state(model, 1)
checkpoint.save_sharded({run!r}, 1, state, tensors, keep=5, dist=Dist())
torch.save(model.state_dict(), {expected!r})
# the shard files of step 2 are written and fsynced; the process dies before DCP's metadata
fs.FileSystemWriter.finish = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
state, tensors = trainer_state(model, 2)
checkpoint.save_sharded({run!r}, 2, state, tensors, keep=5, dist=Dist())
"""


def test_a_killed_sharded_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = KILLED_WRITE.format(tests=str(Path(__file__).parent), run=str(tmp_path / "run"),
                                 expected=str(tmp_path / "expected.pt"))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -9, r.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    left = ckpts / ".step_000000002.dcp.tmp"
    assert list(left.glob("*.distcp")) and not (left / ".metadata").exists()  # killed mid-write
    path, state = checkpoint.newest_loadable(tmp_path / "run")
    assert path == ckpts / "step_000000001.dcp"
    expected = torch.load(tmp_path / "expected.pt")
    assert all(torch.equal(expected[k], v) for k, v in restored(state).state_dict().items())
    # the next write clears what the killed one left
    model = tiny_model()
    state, tensors = trainer_state(model, 3)
    checkpoint.save_sharded(tmp_path / "run", 3, state, tensors, keep=5, dist=Dist())
    assert not left.exists() and checkpoint.newest_loadable(tmp_path / "run")[0].name == "step_000000003.dcp"


def test_rng_states_at_another_world_size(tmp_path):
    """Same world size: each rank's own generator comes back. Another one: every rank reseeds
    from (seed, rank, world size, step), the same on every resume."""
    gen = torch.Generator()
    torch.manual_seed(1)
    saved = checkpoint.rng_state(gen, Dist())
    saved["counters"] = {"step": 7}
    expected = torch.rand(3)
    checkpoint.load_rng_state(saved, gen, Dist(), seed=0)
    assert torch.equal(torch.rand(3), expected)
    two = {**saved, "rank_rng": saved["rank_rng"] * 2}
    draws = []
    for rank in (0, 1, 0):
        checkpoint.load_rng_state(two, gen, Dist("fsdp", rank=rank, world_size=3), seed=0)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], expected)


# ------------------------------------------------------------------ end to end: 2 -> 1, 1 -> 2, 2 -> 2

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """Reference runs: the same command, never stopped, with 2 ranks (fsdp) and with 1 process."""
    out = {}
    for name, ranks, mode in (("fsdp2", 2, "fsdp"), ("none", 0, "none")):
        d = tmp_path_factory.mktemp(name)
        run([*launch(ranks, mode), f"hydra.run.dir={d}/run"], cache_dir, d)
        out[name] = d / "run"
    return out


CASES = {  # first run (ranks, mode), resumed (ranks, mode)
    "2to1": ((2, "fsdp"), (0, "none")),
    "2to1-fsdp": ((2, "fsdp"), (1, "fsdp")),
    "1to2": ((0, "none"), (2, "fsdp")),
    "2to2": ((2, "fsdp"), (2, "fsdp")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_at_another_world_size_mid_ramp(tmp_path, cache_dir, uninterrupted, case):
    """A run checkpointed inside an MSG ramp by N processes continues with M: the same tokens,
    counters and alpha, and the same losses up to the reduction order."""
    (first, resumed) = CASES[case]
    reference = uninterrupted["fsdp2" if first[0] == 2 else "none"]
    shutil.copytree(reference, tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()
    for p in checkpoint.list_checkpoints(tmp_path / "run"):
        if checkpoint.checkpoint_step(p) > RESUME_AT:
            checkpoint.remove(p)
    r = run([*launch(*resumed), f"hydra.run.dir={tmp_path}/run"], cache_dir, tmp_path)
    assert f"resuming from {tmp_path}/run/checkpoints/step_{RESUME_AT:09d}." in r.stdout
    ref, again = read_jsonl(reference / "metrics.jsonl"), read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in again] == [m["step"] for m in ref] and len(ref) == 16
    for a, b in zip(again, ref):
        assert {k: a.get(k) for k in ("tokens", "flops", "layers", "alpha")} == \
               {k: b.get(k) for k in ("tokens", "flops", "layers", "alpha")}
        assert abs(a["loss"] - b["loss"]) <= RELATIVE * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
    assert [m.get("alpha") for m in again if RESUME_AT <= m["step"] <= 13] == [0.0, pytest.approx(1 / 3),
                                                                            pytest.approx(2 / 3), None]
    written = [p for p in checkpoint.list_checkpoints(tmp_path / "run") if checkpoint.checkpoint_step(p) > RESUME_AT]
    assert written and all(checkpoint.is_sharded(p) == (resumed[1] == "fsdp") for p in written)


def test_export_from_a_two_rank_sharded_checkpoint(uninterrupted, tmp_path):
    """msgrun-export streams the newest checkpoint of a 2-rank FSDP run (each rank's shard file
    read for its byte ranges) into safetensors shards that transformers loads with msgrun's logits."""
    transformers = pytest.importorskip("transformers")
    from msgrun.export import checkpoint_model, export_run

    run_dir = uninterrupted["fsdp2"]
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    assert checkpoint.is_sharded(newest) and len(list(newest.glob("__*_0.distcp"))) == 2
    info = export_run(run_dir, tmp_path / "hf", max_shard_bytes=100_000)
    assert info["shards"] > 1 and info["checkpoint"] == str(newest.absolute())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = checkpoint_model(checkpoint.load(newest))
    ids = torch.randint(0, ours.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-4
