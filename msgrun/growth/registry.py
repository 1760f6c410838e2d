"""The registry of growth methods: one entry per method, collected from the modules that define
them. `operator.<dim>` accepts exactly the methods registered for that dimension.

Adding a method: write its module (a `Method` with its hooks, growth/methods.py), add it to
`REGISTERED` below, and give it a preset in conf/operator/ and its rows in docs/fidelity.md
(docs/architecture.md has the checklist).
"""

from __future__ import annotations

from msgrun.growth import copying, expansion, gzero, lemon, ligo, moe
from msgrun.growth.methods import CORE, Method

REGISTERED: tuple[Method, ...] = (*CORE, *copying.METHODS, *expansion.METHODS, lemon.METHOD, ligo.METHOD,
                                  gzero.METHOD, moe.METHOD)
REGISTRY: dict[str, Method] = {m.name: m for m in REGISTERED}
assert len(REGISTRY) == len(REGISTERED), "two growth methods share a name"

DIMS = ("layers", "hidden", "heads", "ffn", "seq_len", "experts")  # operator.<dim> (kv_heads grow with heads)
# dimension -> the names operator.<dim> accepts, in registration order
METHODS: dict[str, tuple[str, ...]] = {d: tuple(m.name for m in REGISTERED if d in m.dims) for d in DIMS}


def get(name: str) -> Method:
    return REGISTRY[name]


def resolved(name: str | None, family: str, pos: str) -> Method | None:
    """The method that runs for `operator.<dim>=name` on this architecture (an alias such as
    seq_len=auto resolves to pool or warmup); None for null."""
    if name is None:
        return None
    method = REGISTRY[name]
    return REGISTRY[method.resolve(family, pos)] if method.resolve is not None else method
