"""Growing grouped-query attention: which head growths each method can do, and why not the others.

A model has A query heads and K key/value heads; query head h reads key/value head h // g with
g = A / K (K = A: multi-head attention, g = 1). Heads grow through `schedule` targets `heads` and
`kv_heads` (unset kv_heads keeps g; see growth/schedule.py), both by the method of
`operator.heads`: a key/value head is a head. The unit maps are built in growth/surgery.py
(`head_maps`): the method's map applies to the key/value heads, and query heads follow their
groups (`query_slots`): a group's old query heads keep reading (a copy of) their own key/value
head; extra query heads of a group copy the group's heads (copying methods) or are new (MSG).

Exactness (fp32, tests/test_gqa.py), with A, K -> A', K' and g, g' the group sizes:

  msg   ours placement: exact at alpha = 0 whenever g' >= g (new query heads masked at the output
        projection; new key/value heads serve new query heads only). Reference placement (q, k, v
        rows masked): exact only when g' = g; with g' > g new query heads read *old* keys and
        values, which the mask does not reach (alpha * scores is a uniform attention at alpha = 0,
        not a zero output), so it is refused. g' < g is refused for both: an old query head
        would have to move to a fresh key/value head.
  fpi, tile, lemon: exact when every old group finds room, i.e. its key/value head is copied
        often enough that (copies x g') >= g. tile and lemon copy every key/value head K'//K
        times; fpi copies each once plus its picks (mapping=left: K'//K times in all, mapping=random:
        possibly once, so fpi with random mapping is refused where only an even split has room).
        Copies of a key/value head need no consumer division (each query head reads one key/value
        head); copied query heads share their output projection columns (1/k, LEMON's unequal
        shares) and fpi/tile add zero-sum symmetry noise there.
  aki, ligo: refused when either shape is grouped (K < A): AKI mixes the next layer's q, k, v rows
        of a head, and LiGO's per-channel q/k/v expansions assume one key/value head per query
        head; neither paper defines them for shared key/value heads.
"""

from __future__ import annotations

from msgrun.errors import ConfigError


def copies_of_each(method: str, mapping: str, old_kv: int, new_kv: int) -> int:
    """The fewest times the method is sure to copy an old key/value head into the grown model."""
    if new_kv == old_kv or method == "msg" or (method in ("fpi", "aki") and mapping == "random"):
        return 1
    return new_kv // old_kv


def check_heads(method: str, cfg, before, after, where: str) -> None:
    """Refuse, before training, a heads / kv_heads growth that `method` cannot do exactly under
    grouped-query attention (shapes `before`, `after`: growth/schedule.py's Shape)."""
    A, K, A2, K2 = before.heads, before.kv_heads, after.heads, after.kv_heads
    if A == K and A2 == K2:
        return  # multi-head attention stays multi-head: every method grows it as before
    g, g2 = A // K, A2 // K2
    shapes = f"{A} query / {K} key-value heads -> {A2} / {K2}"
    if method in ("aki", "ligo", "zero"):
        raise ConfigError(
            f"{where} grows attention ({shapes}) with operator.heads={method}, which is defined for one key/value head "
            "per query head only (grouped-query attention shares key/value heads between query heads). Use "
            "operator.heads=fpi, tile, lemon or msg for a grouped model.")
    if method == "msg" and g2 < g or copies_of_each(method, cfg.mapping, K, K2) * g2 < g:
        extra = (" (operator.mapping=random may copy a key/value head only once; operator.mapping=left copies "
                 "each evenly)" if method in ("fpi", "aki") and cfg.mapping == "random" else "")
        raise ConfigError(
            f"{where} grows attention ({shapes}): groups shrink from {g} to {g2} query heads per key/value head, so "
            f"the {g} query heads of an old group must spread over copies of their key/value head, and "
            f"operator.heads={method} does not copy each one at least {-(-g // g2)} times{extra}. "
            "Grow kv_heads by a multiple of the old count with tile, lemon or fpi (operator.mapping=left), or keep "
            "the group size (leave kv_heads unset in the stage).")
    if method == "msg" and g2 > g and cfg.mask_placement == "reference":
        raise ConfigError(
            f"{where} grows attention ({shapes}) with operator.heads=msg and operator.mask_placement=reference: "
            f"groups grow from {g} to {g2} query heads, so new query heads read old keys and values, which the "
            "reference placement (masks on q, k, v rows) does not reach; at alpha = 0 such a head attends uniformly "
            "and its output is not zero. Use operator.mask_placement=ours (new heads masked at the output "
            "projection), or keep the group size (leave kv_heads unset in the stage).")


def check_learned_operator(methods: dict, final) -> None:
    """LiGO's B_q, B_k, B_v expand attention channels of equal width (A x d_h each) and its depth
    mixture is keyed by a dense block's parameters: refuse grouped attention and experts at once."""
    if "ligo" not in methods.values():
        return
    if final.kv_heads != final.heads or final.experts > 1:
        raise ConfigError(
            f"operator=ligo learns one expansion per attention channel of q, k and v (each A x d_h wide) and mixes "
            f"dense blocks; this model has {final.kv_heads} key/value heads for {final.heads} heads and "
            f"{final.experts} FFN experts. Use LiGO with model.kv_heads=null and model.experts=1, or another operator.")
