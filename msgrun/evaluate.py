"""Downstream evaluation: the `eval` config group, run by the trainer after training (and, if
asked, on the model each growth event grows and every `eval.every` steps).

Two kinds of task, each logged as `eval/<task>/<metric>` in metrics.jsonl (a line of its own,
with step, tokens, flops and wall_time), in wandb, and the last results in summary.json:

* perplexity (`eval.perplexity.<task>`): held-out text from files or a Hugging Face dataset,
  tokenized with the run's tokenizer exactly as training data (documents separated by eot) and
  scored by msgrun itself, like the validation loss: windows of model.seq_len + 1 tokens (gpt:
  next-token loss; bert: masked-token loss at fixed 15% masks). Metrics: loss [nats/token], ppl
  (exp of loss), bpb (bits per UTF-8 byte, comparable across tokenizers), tokens.
* lm-evaluation-harness (`eval.lm_eval.tasks`): the model is exported in memory to its
  Hugging Face class (msgrun.export, the same mapping as msgrun-export) and scored through
  lm-eval's Python API. Local YAML tasks in `eval.lm_eval.include_path` and the bundled example
  (msgrun/eval_tasks/) work offline; hub tasks are the same code path with network.

Evaluation draws no random numbers the run sees (every generator is restored afterwards), is
not counted in wall_time or flops, and is checked before any compute: unknown tasks, missing
files, lm-eval on a BERT model or without the `msgrun[eval]` extra are ConfigErrors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import socket
from pathlib import Path

import numpy as np
import torch

from omegaconf import OmegaConf

from msgrun import data, distributed
from msgrun.config import TextSourceConfig
from msgrun.errors import ConfigError
from msgrun.extras import install_hint

BUNDLED_TASKS = Path(__file__).with_name("eval_tasks")


@contextlib.contextmanager
def preserved_rng():
    """Restore every generator the run draws from (lm-eval seeds python, numpy and torch)."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def hub_host() -> tuple[str, int]:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(hub_host(), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_if_unreachable(src):
    """Load a hub dataset in offline mode (from the cache) when the hub cannot be reached: the
    hub client otherwise retries for about 30 s before it gives up. Yields the hub's host name
    when it switched to offline mode, else None. Local builders (data files) never ask the hub."""
    if src.name != "hf" or src.hf_data_files or Path(str(src.hf_path or "")).exists():
        yield None
        return
    try:
        import datasets.config
        from huggingface_hub import constants
    except ImportError:  # the hf source says which extra to install
        yield None
        return
    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield None
        return
    # both libraries read the switch from their module constants (set from HF_HUB_OFFLINE at import)
    flags = [(m, name) for m in (constants, datasets.config) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
             if hasattr(m, name)]
    saved = [getattr(m, name) for m, name in flags]
    for m, name in flags:
        setattr(m, name, True)
    try:
        yield hub_host()[0]
    finally:
        for (m, name), value in zip(flags, saved):
            setattr(m, name, value)


class Downstream:
    def __init__(self, cfg, corpus, final_args, log=print):
        ec = cfg.eval
        self.cfg, self.corpus, self.final_args, self.log = ec, corpus, final_args, log
        self.seq_len, self.family = cfg.model.seq_len, cfg.model.family
        self.mlm_probability = cfg.model.mlm_probability
        self.perplexity = {name: self.perplexity_batches(name, src, cfg.train.batch_size)
                           for name, src in ec.perplexity.items()}
        self.tasks = list(ec.lm_eval.tasks)
        if self.tasks:
            self.check_lm_eval()

    @property
    def active(self) -> bool:
        return bool(self.perplexity or self.tasks)

    def due(self, when: str, step: int = 0) -> bool:
        """when: end | growth | step."""
        if not self.active:
            return False
        return {"end": self.cfg.at_end, "growth": self.cfg.at_growth,
                "step": bool(self.cfg.every) and step % max(self.cfg.every, 1) == 0}[when]

    # ------------------------------------------------------------------ perplexity
    def perplexity_batches(self, name: str, src, batch_size: int) -> list[dict]:
        """The task's text as the run's tokens, in the validation loss's fixed batches."""
        key = f"eval.perplexity.{name}"
        try:
            src = OmegaConf.merge(OmegaConf.structured(TextSourceConfig), src)
        except Exception as e:  # noqa: BLE001 - OmegaConf's errors name the bad key
            raise ConfigError(f"{key}: {e}. Its keys: {', '.join(f.name for f in dataclasses.fields(TextSourceConfig))}.") from e
        if src.name not in ("files", "hf"):
            raise ConfigError(f"{key}.name = {src.name!r}; held-out text comes from files or hf.")
        if src.max_tokens < self.seq_len + 1:
            raise ConfigError(f"{key}.max_tokens = {src.max_tokens} is less than one window of model.seq_len + 1 = "
                              f"{self.seq_len + 1} tokens.")
        try:
            with hub_offline_if_unreachable(src) as unreachable:
                docs, _ = data.list_documents(src)
        except data.DataError as e:
            if unreachable:
                raise ConfigError(
                    f"{key}: {src.hf_path} ({src.hf_name}) is not in the local Hugging Face datasets cache, and the "
                    f"hub ({unreachable}) cannot be reached from this machine. Run once where there is network "
                    "(the datasets cache, HF_HOME, can then be copied here), or leave the task out (eval=none)."
                    f"\n({e})") from e
            raise ConfigError(f"{key} (read as data=files/hf reads; data.X below means {key}.X): {e}") from e
        texts = [d.read() for d in docs]
        if src.join:  # one text (e.g. wikitext rows are lines of one article stream)
            texts = ["".join(texts)]
        tok, _ = data.load_tokenizer(self.corpus.tokenizer_path)
        tokens = data.Tokens(data.encode_texts(tok, texts, self.corpus.eot_id, self.corpus.train.dtype))
        held_out = dataclasses.replace(self.corpus, val=tokens)
        try:
            return data.fixed_eval_batches(held_out, self.seq_len, min(batch_size, 16), src.max_tokens,
                                           self.family, seed=0, mlm_probability=self.mlm_probability)
        except data.DataError as e:
            raise ConfigError(f"{key}: the text has {len(tokens):,} tokens, fewer than one window of model.seq_len "
                              f"+ 1 = {self.seq_len + 1}. Give more text or lower model.seq_len.") from e

    # ------------------------------------------------------------------ lm-evaluation-harness
    def check_lm_eval(self) -> None:
        lc = self.cfg.lm_eval
        if self.family != "gpt":
            raise ConfigError(
                f"eval.lm_eval.tasks = {self.tasks} needs a causal model: lm-evaluation-harness scores "
                "AutoModelForCausalLM models, and model.family=bert exports as BertForMaskedLM. Use "
                "eval.perplexity for BERT (masked-token loss on held-out text), or set eval.lm_eval.tasks=[].")
        from msgrun.export import ExportError, hf_architecture

        try:
            hf_architecture(self.final_args)  # lm-eval scores the exported model
        except ExportError as e:
            raise ConfigError(f"eval.lm_eval.tasks needs the model in a Hugging Face class: {e}") from e
        try:
            import lm_eval  # noqa: F401
            import transformers  # noqa: F401
            from lm_eval.tasks import TaskManager
        except ImportError as e:
            raise ConfigError(f"eval.lm_eval.tasks = {self.tasks} needs lm-evaluation-harness and transformers "
                              f"({e}): {install_hint('lm-eval')}, or set eval.lm_eval.tasks=[].") from e
        paths = [str(BUNDLED_TASKS)]
        if lc.include_path:
            p = Path(lc.include_path).expanduser()
            if not p.is_dir():
                raise ConfigError(f"eval.lm_eval.include_path = {lc.include_path}: no such directory (it should hold "
                                  "task YAML files, like msgrun/eval_tasks/msgrun_pycode/).")
            paths.append(str(p.absolute()))
        # local tasks first: indexing lm-eval's thousands of bundled YAML files takes seconds
        local = TaskManager(include_path=paths, include_defaults=False)
        self.task_manager = local
        if any(t not in local.all_tasks for t in self.tasks):
            self.task_manager = TaskManager(include_path=paths)
        unknown = [t for t in self.tasks if t not in self.task_manager.all_tasks]
        if unknown:
            raise ConfigError(f"eval.lm_eval.tasks: {unknown} are not lm-evaluation-harness tasks. Local tasks found: "
                              f"{', '.join(sorted(local.all_tasks)) or 'none'} (in {', '.join(paths)}); the harness's "
                              "own tasks are named as `lm-eval ls tasks` lists them.")

    def lm_eval(self, hf, tokenizer, device: torch.device) -> dict:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lc = self.cfg.lm_eval
        dev = torch.device(lc.device) if lc.device else device
        lm = HFLM(pretrained=hf.to(dev), tokenizer=tokenizer, batch_size=lc.batch_size, max_length=self.seq_len,
                  device=str(dev), dtype=torch.float32)
        limit = lc.limit if lc.limit is None or lc.limit < 1 else int(lc.limit)
        out = lm_eval.simple_evaluate(model=lm, tasks=self.tasks, num_fewshot=lc.num_fewshot, limit=limit,
                                      task_manager=self.task_manager, log_samples=False, verbosity="ERROR",
                                      bootstrap_iters=0)
        results = {}
        for task, metrics in out["results"].items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and filt:
                    name = metric if filt == "none" else f"{metric}_{filt}"
                    results[f"eval/{task}/{name}"] = float(value)
        return results

    # ------------------------------------------------------------------ both
    @torch.no_grad()
    def run(self, model, nll, dist, device: torch.device, masked: list[str], pool: int) -> dict:
        """All tasks on `model`. `nll(batches)` is the trainer's validation loss on other batches
        ({val_loss, val_bpb}); every rank calls this (FSDP gathers), rank 0 runs lm-eval."""
        results = {}
        with preserved_rng():
            for name, batches in self.perplexity.items():
                r = nll(batches)
                results.update({f"eval/{name}/loss": r["val_loss"], f"eval/{name}/ppl": math.exp(r["val_loss"]),
                                f"eval/{name}/bpb": r["val_bpb"],
                                f"eval/{name}/tokens": sum(int(b["targets"].numel())
                                                            for b in batches)})
            if self.tasks:
                results.update(self.lm_eval_on(model, dist, device, masked, pool))
        return results

    def lm_eval_on(self, model, dist, device, masked, pool) -> dict:
        from msgrun import export

        state = {k: distributed.full_tensor(v) for k, v in model.state_dict().items()}  # every rank: collective
        out = {}
        if dist.rank == 0:
            try:
                export.check_state(masked, pool)
            except export.ExportError as e:
                self.log(f"eval: lm-eval skipped at this point: {e}")
                return distributed.broadcast(out, dist)
            special = {"eot": self.corpus.eot_id, "pad": self.corpus.pad_id, "mask": self.corpus.mask_id}
            hf = export.to_hf(model.args, state, special)
            tokenizer = export.hf_tokenizer(self.corpus.tokenizer_path, self.seq_len)
            out = self.lm_eval(hf, tokenizer, device)
        return distributed.broadcast(out, dist)
