"""The operators of issue 14: LLaMA-Pro block expansion, SOLAR depth up-scaling, MIDAS gradual middle
stacking and LEMON's lossless width/depth growth. Exactness where the method claims it (odd,
non-multiple sizes), the measured jump where it does not, layer maps against the papers' recipes,
refusals before training, optimizer moments by provenance, and every preset through the loop."""

import math

import pytest
import torch

from msgrun.errors import ConfigError
from msgrun.growth import expansion
from msgrun.growth.optim_transfer import transfer_adamw
from msgrun.config import OptimConfig
from msgrun.optim import build_adamw

from test_operators import CHANGED, EXACT, FAMILIES, SMALL, grow, logit_diff, make_model, operator, run

PRE_NORM = {k: v for k, v in FAMILIES.items() if k != "bert"}
pre_norm = pytest.mark.parametrize("arch", PRE_NORM.values(), ids=PRE_NORM.keys())
archs = pytest.mark.parametrize("arch", FAMILIES.values(), ids=FAMILIES.keys())


# ---------------------------------------------------------------------------- layer maps
@pytest.mark.parametrize("old,new,sources,zeroed", [
    (32, 40, None, None),  # the paper's LLaMA-2 7B -> 8B Pro: one copy after every 4 blocks
    (3, 4, [0, 1, 2, 2], [False, False, False, True]),
    (5, 7, [0, 1, 1, 2, 3, 3, 4], [False, False, True, False, False, True, False]),  # split int(5/2) = 2
    (2, 4, [0, 0, 1, 1], [False, True, False, True]),
])
def test_llama_pro_places_one_zeroed_copy_after_each_group(old, new, sources, zeroed):
    got, got_zeroed = expansion.layer_sources("llama_pro", old, new)
    if sources is None:  # the reference's split = L / P = 4: after blocks 3, 7, ..., 31
        sources = [s for g in range(8) for s in list(range(4 * g, 4 * g + 4)) + [4 * g + 3]]
        zeroed = [i % 5 == 4 for i in range(40)]
    assert got == sources and got_zeroed == zeroed


@pytest.mark.parametrize("old,new,sources", [
    (32, 48, list(range(24)) + list(range(8, 32))),  # SOLAR 10.7B: m = 8
    (3, 4, [0, 1, 1, 2]),
    (3, 5, [0, 1, 2, 1, 2]),  # odd target: the first copy keeps one layer more
    (2, 4, [0, 1, 0, 1]),  # m = 0: plain stacking
])
def test_solar_concatenates_bottom_and_top_of_two_copies(old, new, sources):
    assert expansion.layer_sources("solar", old, new) == (sources, [False] * new)


@pytest.mark.parametrize("old,new,sources", [
    (1, 2, [0, 0]),
    (3, 6, [0, 1, 2, 0, 1, 2]),
    (6, 9, [0, 1, 2, 0, 1, 2, 3, 4, 5]),  # two blocks of 3: the lower middle one is duplicated
    (9, 12, [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]),  # three blocks: the middle one
    (5, 7, [0, 1, 2, 1, 2, 3, 4]),  # b = 2 does not tile 5 layers: the block at floor((5 - 2) / 2) = 1
])
def test_midas_duplicates_the_middle_block_in_place(old, new, sources):
    assert expansion.layer_sources("midas", old, new) == (sources, [False] * new)


# ---------------------------------------------------------------------------- depth exactness
@pre_norm
@pytest.mark.parametrize("method,new", [("llama_pro", 4), ("llama_pro", 6), ("lemon", 4), ("lemon", 5)])
def test_identity_blocks_are_exact_in_pre_norm(arch, method, new):
    model = make_model(arch)
    grown = grow(model, operator(layers=method), layers=new)
    assert grown.model.args.layers == new
    assert logit_diff(model, grown.model) <= EXACT
    _, zeroed = expansion.layer_sources(method, 3, new)
    for i, z in enumerate(zeroed):  # new blocks: trained input weights, zero output projections
        block = grown.model.blocks[i]
        assert (block.mlp.proj.weight.abs().sum() == 0) == z and (block.attn.proj.weight.abs().sum() == 0) == z
        assert block.attn.qkv.weight.abs().sum() > 0


@pre_norm
@pytest.mark.parametrize("method", ["solar", "midas"])
def test_solar_and_midas_are_not_function_preserving(arch, method):
    model = make_model(arch)
    grown = grow(model, operator(layers=method), layers=5)
    assert logit_diff(model, grown.model) > CHANGED


def test_identity_entry_depth_is_refused_for_post_norm(make_cfg):
    from msgrun.growth.engine import GrowthEngine
    from msgrun.train import final_model_args
    cfg = make_cfg("model=bert_tiny", "schedule=layers_only", "operator.layers=llama_pro")
    with pytest.raises(ConfigError, match="post-norm"):
        GrowthEngine(cfg, final_model_args(cfg.model, 256))


@pytest.mark.parametrize("method,start", [("llama_pro", 1), ("solar", 1), ("midas", 1)])
def test_depth_growth_beyond_twice_is_refused(make_cfg, method, start):
    from msgrun.growth.engine import GrowthEngine
    from msgrun.train import final_model_args
    cfg = make_cfg("schedule=layers_only", f"operator.layers={method}", f"schedule.start.layers={start}")
    with pytest.raises(ConfigError, match="at most 2 layers from 1"):
        GrowthEngine(cfg, final_model_args(cfg.model, 256))


# ---------------------------------------------------------------------------- LEMON width
@archs
@pytest.mark.parametrize("dim,old,new", [("heads", 3, 5), ("ffn", 200, 333), ("heads", 3, 6)])
def test_lemon_heads_and_ffn_are_exact_at_non_multiples(arch, dim, old, new):
    model = make_model(arch, **{dim: old})
    grown = grow(model, operator(**{dim: "lemon"}, symmetry_noise=0.2), **{dim: new})
    assert logit_diff(model, grown.model) <= EXACT


@pre_norm
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("old,new", [(96, 131), (64, 161), (96, 192)])
def test_lemon_hidden_is_exact_at_non_multiples_under_norms(arch, tie, old, new):
    model = make_model({**arch, "tie_embeddings": tie}, hidden=old)
    grown = grow(model, operator(hidden="lemon", symmetry_noise=0.2), hidden=new)
    assert grown.model.args.hidden == new
    assert logit_diff(model, grown.model) <= EXACT


def test_lemon_bert_hidden_multiple_is_exact_and_non_multiple_refused(make_cfg):
    model = make_model(FAMILIES["bert"], hidden=64)
    grown = grow(model, operator(family="bert", hidden="lemon", heads="lemon", ffn="lemon", symmetry_noise=0.2),
                 hidden=128, heads=5, ffn=333)
    assert logit_diff(model, grown.model) <= EXACT
    from msgrun.growth.engine import GrowthEngine
    from msgrun.train import final_model_args
    cfg = make_cfg("model=bert_tiny", "schedule=hidden_only", "operator.hidden=lemon", "schedule.start.hidden=96")
    with pytest.raises(ConfigError, match="divisible widths only"):
        GrowthEngine(cfg, final_model_args(cfg.model, 256))


@pre_norm
def test_lemon_every_dimension_at_once_is_exact_and_breaks_symmetry(arch):
    model = make_model(arch, hidden=64)
    op = operator(layers="lemon", hidden="lemon", heads="lemon", ffn="lemon", symmetry_noise=0.2)
    grown = grow(model, op, layers=5, hidden=101, heads=4, ffn=257)
    assert logit_diff(model, grown.model) <= EXACT
    # the copies' consumers take different shares of the source: a copy of head 0 (head 3) and
    # head 0 itself read different attn.proj columns, summing to the original
    old_cols = model.blocks[0].attn.proj.weight[:64, :16]
    new_w = grown.model.blocks[0].attn.proj.weight
    a, b = new_w[:64, :16], new_w[:64, 48:64]
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a + b, old_cols, atol=1e-6, rtol=1e-5)
    assert grown.model.args.norm_eps == pytest.approx(model.args.norm_eps * 64 / 101)


# ---------------------------------------------------------------------------- presets and the loop
NEW = {  # experiment: (growth events, function preserving)
    "llama_pro": (1, True),
    "solar": (1, False),
    "midas": (3, False),
    "lemon": (1, True),
    "ligo": (1, False),
}
MODELS = ("gpt_tiny", "llama_tiny", "gpt_small", "gpt_medium", "llama_small", "bert_tiny", "bert_base", "bert_large")
POST_NORM_REFUSED = {"llama_pro"}  # identity-entry depth needs pre-norm blocks


@pytest.mark.parametrize("exp", NEW)
@pytest.mark.parametrize("model", MODELS)
def test_each_experiment_resolves_on_every_shipped_model(make_cfg, exp, model):
    from msgrun.growth.engine import GrowthEngine
    from msgrun.train import final_model_args
    cfg = make_cfg(f"experiment={exp}", f"model={model}", "train.max_steps=240")
    if model.startswith("bert") and exp in POST_NORM_REFUSED:
        with pytest.raises(ConfigError, match="post-norm"):
            GrowthEngine(cfg, final_model_args(cfg.model, 4096))
        return
    engine = GrowthEngine(cfg, final_model_args(cfg.model, 4096))
    assert len(engine.stages) == NEW[exp][0]


@pytest.mark.parametrize("arch", ["model=gpt_tiny", "model=llama_tiny"])
@pytest.mark.parametrize("exp", NEW)
def test_each_new_operator_trains_through_its_experiment(make_cfg, tmp_path, exp, arch):
    n_events, exact = NEW[exp]
    small = [o for o in SMALL if "ffn" not in o and "heads" not in o] + ["model.heads=4", "model.ffn=96"]
    trainer, metrics, events = run(make_cfg, tmp_path, f"experiment={exp}", arch, *small, "model.layers=4",
                                   "train.max_steps=12", "train.log_every=4", "train.eval_every=12")
    assert len(events) == n_events
    assert trainer.engine.shape == trainer.engine.final_shape
    assert all(math.isfinite(m["loss"]) for m in metrics)
    diffs = [e["max_abs_logit_diff"] for e in events]
    assert all(d <= EXACT for d in diffs) if exact else all(d > CHANGED for d in diffs)


def test_lemon_consumers_of_copies_get_the_sources_gradient_and_moments():
    """Copies carry the same activation as their source, so every consumer column of a copy (A - C
    or C alike) gets exactly the source column's gradient: the moved AdamW moments must be the
    source's, unscaled. (The copies' producing rows get C^T g and (A - C)^T g, no scalar share of
    the source's gradient: with operator.optimizer_state=carry they take 1/k of its moments.)"""
    from test_operators import VOCAB, SEQ, gather, gradients
    from msgrun.config import OperatorConfig
    model = make_model(FAMILIES["gpt_layernorm"])
    opt = build_adamw(model, 1e-3, OptimConfig(weight_decay=0.0), "cpu")
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        gradients(model, torch.randint(3, VOCAB, (4, SEQ), generator=g), None)
        opt.step()
    grown = grow(model, operator(ffn="lemon", symmetry_noise=0.1), ffn=333)
    new_opt = transfer_adamw(opt, model, grown.model, grown.origins, OperatorConfig(), OptimConfig(), "cpu")
    idx = torch.randint(3, VOCAB, (4, SEQ), generator=g)
    gradients(model, idx, None)
    gradients(grown.model, idx, None)
    name = "blocks.1.mlp.proj.weight"
    p, source = dict(grown.model.named_parameters())[name], dict(model.named_parameters())[name]
    origin = grown.origins[name]
    torch.testing.assert_close(p.grad, gather(source.grad, origin), atol=1e-7, rtol=1e-4)
    state, old = new_opt.state[p], opt.state[source]
    torch.testing.assert_close(state["exp_avg"], gather(old["exp_avg"], origin))
    torch.testing.assert_close(state["exp_avg_sq"], gather(old["exp_avg_sq"], origin))


# ---------------------------------------------------------------------------- LLaMA-Pro's frozen blocks
@pre_norm
def test_frozen_flops_equal_what_autograd_executes(arch):
    """FLOPs charged for a step of a model whose old blocks are frozen equal FlopCounterMode's
    count of the forward and backward that actually run."""
    from torch.utils.flop_counter import FlopCounterMode
    from msgrun.flops import train_flops
    from msgrun.growth.engine import exact_numerics
    from test_operators import SEQ, VOCAB
    model = make_model(arch, layers=5)
    trainable = [2, 4]
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(f"blocks.{i}.") for i in trainable))
    idx = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with exact_numerics(), FlopCounterMode(display=False) as counter:  # math attention: scores are matmuls
        _, loss = model(idx, idx)
        loss.backward()
    charged = train_flops(model.args, 2, SEQ, trainable=trainable)
    assert charged == counter.get_total_flops()
    assert charged < train_flops(model.args, 2, SEQ)


def test_freeze_old_trains_only_the_new_blocks_and_survives_resume(make_cfg, tmp_path):
    from msgrun import checkpoint
    from msgrun.flops import train_flops
    from msgrun.train import Trainer
    small = [o for o in SMALL if "ffn" not in o and "heads" not in o] + ["model.heads=4", "model.ffn=96"]
    overrides = ["experiment=llama_pro", "operator.freeze_old=true", *small, "model.layers=4",
                 "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=4",
                 "train.max_steps=8", "train.log_every=1", "train.eval_every=8"]
    trainer, metrics, events = run(make_cfg, tmp_path, *overrides)
    model = trainer.model
    assert trainer.engine.trainable_layers == [3]  # 3 blocks -> 4: the copy of block 2 after it
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if n.startswith("blocks.3.")]
    # after the event, each step is charged what the frozen model executes
    rows, T = trainer.engine.layout(trainer.engine.shape).rows, trainer.cfg.model.seq_len
    assert metrics[-1]["flops"] - metrics[-2]["flops"] == train_flops(model.args, rows, T, trainable=[3])
    # the checkpoint right after the event and the final one: old blocks untouched, the new one trained
    after_event, final = [torch.load(p, weights_only=True) for p in checkpoint.list_checkpoints(tmp_path)[-2:]]
    assert after_event["counters"]["step"] == 4 and final["counters"]["step"] == 8
    for name, value in final["model"].items():
        assert torch.equal(value, after_event["model"][name]) != name.startswith("blocks.3."), name
    # a resumed trainer freezes the same blocks again
    resumed = Trainer(make_cfg(*overrides, "train.max_steps=10"), tmp_path)
    resumed.load_state_dict(final)
    assert [n for n, p in resumed.model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if n.startswith("blocks.3.")]


def test_freeze_old_is_refused_without_llama_pro(make_cfg):
    from msgrun.growth.engine import GrowthEngine
    from msgrun.train import final_model_args
    cfg = make_cfg("experiment=solar", "operator.freeze_old=true")
    with pytest.raises(ConfigError, match="operator.freeze_old"):
        GrowthEngine(cfg, final_model_args(cfg.model, 256))


def test_lemon_lr_recipe_keeps_the_peak_and_decays_faster():
    from msgrun.optim import LEMON_DECAY_SPAN, LRSchedule
    cfg = OptimConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    lr = LRSchedule.create(1.0, cfg)
    for step in range(40):  # once per step, in order, as the training loop calls it
        lr(step, step / 100)
    assert lr(40, 0.4) < 0.9  # decayed before the event
    lr.on_growth("lemon", 40, 0.4)
    assert lr(40, 0.4) == pytest.approx(1.0)  # back to the peak, no warmup
    end = 0.4 + 0.6 * LEMON_DECAY_SPAN
    assert lr(69, end - 0.01) > 0.1 and lr(70, end) == pytest.approx(0.1) and lr(99, 0.99) == pytest.approx(0.1)
    assert lr(55, 0.4 + 0.3 * LEMON_DECAY_SPAN) == pytest.approx(0.55)  # half-way down the cosine


# ---------------------------------------------------------------------------- LiGO
def ligo_data(family, rows=2):
    """Fitting batches: two micro-batches per step, different per step."""
    from test_operators import SEQ, VOCAB

    def data(k):
        out = []
        for micro in range(2):
            idx = torch.randint(3, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(10 * k + micro))
            if family == "bert":
                out.append({"inputs": idx, "targets": idx[:, :3], "positions": torch.tensor([[0, 5, 23]] * rows)})
            else:
                out.append({"inputs": idx, "targets": idx})
        return out
    return data


@archs
@pytest.mark.parametrize("grown", [dict(layers=5, hidden=96, heads=4, ffn=257), dict(layers=5), dict(heads=4)],
                         ids=["all", "depth", "heads"])
def test_ligo_charges_exactly_the_flops_its_fitting_executes(arch, grown):
    """Where hidden does not grow, nothing the head reads depends on the operator: its weight
    gradient is never computed, and the charge must leave it out."""
    from dataclasses import replace
    from torch.utils.flop_counter import FlopCounterMode
    from msgrun.config import OperatorConfig
    from msgrun.growth import ligo
    from msgrun.growth.engine import exact_numerics
    model = make_model(arch, hidden=64)
    new = replace(model.args, **grown)
    opts = OperatorConfig(ligo_steps=2, ligo_lr=1e-3)
    with exact_numerics(), FlopCounterMode(display=False) as counter:  # math attention: scores are matmuls
        grown_model, flops = ligo.fit(model, new, torch.Generator().manual_seed(0), opts, ligo_data(arch["family"]))
    assert flops == counter.get_total_flops()
    assert grown_model.args == new


def test_ligo_fitting_lowers_the_grown_models_loss_on_its_data():
    from dataclasses import replace
    from msgrun.growth import ligo
    model = make_model(FAMILIES["gpt_layernorm"], hidden=64)
    new = replace(model.args, layers=5, hidden=96, heads=4, ffn=257)
    data = ligo_data("gpt", rows=4)

    def loss(m):
        with torch.no_grad():
            return sum(m(b["inputs"], b["targets"])[1].item() for b in data(0))

    from msgrun.config import OperatorConfig
    at_init, _ = ligo.fit(model, new, torch.Generator().manual_seed(0), OperatorConfig(ligo_steps=0), data)
    fast = OperatorConfig(ligo_steps=8, ligo_lr=1e-2, ligo_warmup=0)  # the preset's warmup would barely move it
    fitted, _ = ligo.fit(model, new, torch.Generator().manual_seed(0), fast, lambda k: data(0))
    assert loss(fitted) < loss(at_init) - 0.01


@pytest.mark.parametrize("overrides,message", [
    (["operator=ligo", "operator.layers=stack"], "does not compose"),
    (["operator=ligo", "operator.ligo_steps=-1"], "ligo_steps"),
    (["operator=ligo", "train.distributed=ddp"], "one process"),
])
def test_ligo_refusals(make_cfg, overrides, message):
    from msgrun.growth.engine import GrowthEngine
    from msgrun.train import final_model_args
    from msgrun.config import check_config
    cfg = make_cfg("schedule=all_at_once", *overrides)
    with pytest.raises(ConfigError, match=message):  # ranges in check_config, composition in the engine
        check_config(cfg)
        GrowthEngine(cfg, final_model_args(cfg.model, 256))


def test_ligo_fitting_is_charged_to_the_run(make_cfg, tmp_path):
    from msgrun.flops import train_flops
    small = [o for o in SMALL if "ffn" not in o and "heads" not in o] + ["model.heads=4", "model.ffn=96"]
    trainer, metrics, events = run(make_cfg, tmp_path, "experiment=ligo", "operator.ligo_steps=2", *small,
                                   "model.layers=4", "schedule.stages.0.at_fraction=null",
                                   "schedule.stages.0.at_step=3", "train.max_steps=6", "train.log_every=1",
                                   "train.eval_every=6")
    (event,) = events
    rows, T = trainer.engine.layout(trainer.engine.shape).rows, trainer.cfg.model.seq_len
    small_args = trainer.engine.operator.model_args(trainer.engine.shape_before(trainer.engine.stages[0]),
                                                    trainer.final_args)
    # two fitting steps cost at least two training steps of the grown model, plus the operator's matmuls
    assert event["operator_flops"] > 2 * train_flops(trainer.model.args, rows, T)
    jump = metrics[3]["flops"] - metrics[2]["flops"]  # the step after the event, with the fitting
    assert jump == train_flops(trainer.model.args, rows, T) + event["operator_flops"]
    assert metrics[2]["flops"] - metrics[1]["flops"] == train_flops(small_args, rows, T)


def test_operator_comparison_sweep_runs_each_experiment_with_its_own_operator(make_cfg):
    """Every job of sweep=operator_comparison composes with its experiment's operator and passes the
    engine's checks (the sweep once overrode every operator with `none`, refusing all but the baseline)."""
    from pathlib import Path
    from omegaconf import OmegaConf
    from msgrun.growth.engine import GrowthEngine
    from msgrun.train import final_model_args
    sweep = OmegaConf.load(Path(__file__).parents[1] / "sweeps" / "operator_comparison.yaml")
    experiments = sweep.hydra.sweeper.params.experiment.split(",")
    assert set(NEW) <= set(experiments)
    for exp in experiments:
        cfg = make_cfg("sweep=operator_comparison", f"experiment={exp}")
        expected = OmegaConf.load(Path(__file__).parents[1] / "conf" / "experiment" / f"{exp}.yaml").defaults
        operator = [d["override /operator"] for d in expected if "override /operator" in d][0]
        assert cfg.operator.name == operator, exp
        GrowthEngine(cfg, final_model_args(cfg.model, 4096))
