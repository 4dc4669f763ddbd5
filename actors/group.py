"""A data-parallel group of DeepSpeed actors: create N ranks, join them in one process group, call them all.

DeepSpeed's collective methods need every rank, so the controller calls a method on the whole
group: ``group.call(lambda r: r.update.remote(batch, step, epochs))``. The method is named in
code, not by a string, so types and grep keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray


def kill_quietly(actor: Any) -> None:
    """``ray.kill``, for clean-up after a failure: an error of its own (Ray shutting down) must not
    replace the failure being raised, nor stop the clean-up of the next actor."""
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - the failure being raised is the one to report
        pass


class RankGroup:
    """N ranks of one model (``PolicyLearner`` or ``Critic``), each a Ray actor.

    Args:
        actor_cls: the ``@ray.remote`` class; its constructor takes ``(rank, world, *args)``.
        world: number of ranks.
        options: Ray actor options of every rank (resources, runtime environment).
        args: the rest of the constructor's arguments, the same for every rank.
    """

    def __init__(self, actor_cls: Any, world: int, options: dict[str, Any], *args: Any) -> None:
        self.ranks = [actor_cls.options(**options).remote(rank, world, *args) for rank in range(world)]
        try:
            addr, port = ray.get(self.ranks[0].rendezvous.remote())
            ray.get([r.setup.remote(addr, port) for r in self.ranks])
        except BaseException:  # a rank that failed to start or join: the group is not made, none of it lives on
            for r in self.ranks:
                kill_quietly(r)
            raise

    def call(self, method: Callable[[Any], ray.ObjectRef]) -> list[ray.ObjectRef]:
        """``method(rank)`` on every rank, in rank order; the object refs of the calls."""
        return [method(rank) for rank in self.ranks]

    def get(self, method: Callable[[Any], ray.ObjectRef]) -> list[Any]:
        """``method(rank)`` on every rank, waiting for all results (rank order)."""
        return ray.get(self.call(method))


def actor_handles(roles: dict[str, Any], only: str | None = None) -> list[Any]:
    """The actors of a role -> (actor, ``RankGroup`` or None) map, a group's every rank; with
    ``only``, that role's alone."""
    picked = [h for role, h in roles.items() if only is None or role == only]
    return [a for h in picked for a in (h.ranks if isinstance(h, RankGroup) else [h] if h is not None else [])]
