"""The outer loop of the local-step family (Qsparse-local-SGD, DiLoCo, SparseLoCo): after the
inner steps, the due workers send their compressed net progress, and every rank applies what
arrives to its replica of the global (master) model with the outer optimizer.

One exchange of a fragment ``P`` of the parameters (all of them unless streaming), by the due
workers ``D`` (all of them unless asynchronous)::

    worker r in D:  Delta_r = beta mem_r + (x_last_r - x_r)      net progress plus decayed memory
                    q_r = QComp(Delta_r);  mem_r = Delta_r - q_r
    every rank:     Delta = sum_{r in D} q_r / n                  in worker order
                    m = mu m + Delta;  x -= outer_lr (Delta + mu m)   (mu = 0: x -= outer_lr Delta)
    worker r in D:  x_r = x_last_r = x       (delayed: x_r = mix x_r + (1 - mix) x)

With every worker due together, ``x_last`` *is* the master model; asynchronously every rank
keeps one more copy (``master``), since a worker that was not due keeps the model it last
pulled (``x_last``). The payloads travel by one all-gather when every worker is due (one
all-reduce for fp32 pseudo-gradients, which add up), else by one broadcast per due worker: a
step moves only the due workers' bytes. If any payload holds a
non-finite value nothing moves: the master and the memories keep their values and the due
workers restart from the master.

With ``delay = tau`` an exchange launched after step ``t`` is applied after step ``t + tau``
(the inner steps in between overlap it); it is then kept in checkpoints with what arrived.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.futures import Future

from ..compress.sparse_plan import Message, MessagePlan
from ..core import add_unless, keep_unless
from ..core.layouts import LayoutCache
from . import schedules
from .local import LocalSteps
from .local_settings import QsparseSettings

if TYPE_CHECKING:  # the state this mixin is part of
    from ..core import Generators, HookState

    _State = HookState
else:
    _State = object


@dataclass
class Flight:
    """An exchange launched and not yet applied."""

    land: int  # the local step after which it is applied
    fragment: int
    workers: list[int]
    rows: list[Future[torch.Tensor]] | torch.Tensor  # the payloads' futures, or the payloads
    error: torch.Tensor | None  # this worker's memory if the exchange is finite (None: not due)
    local: list[Message] | None = None  # this worker's decoded message (shared-index codecs)
    summed: bool = False  # one row: the sum of every worker's message (an all-reduce)

    def arrived(self) -> torch.Tensor:
        """The due workers' payloads, one row each in worker order."""
        if not torch.is_tensor(self.rows) and not self.rows:  # nothing of it on this rank
            self.rows = torch.empty((len(self.workers), 0), dtype=torch.uint8)
        if not torch.is_tensor(self.rows):
            got = [f.wait() for f in self.rows]
            if self.summed:
                self.rows = got[0].view(torch.uint8).view(1, -1)
            else:
                self.rows = got[0] if got[0].dim() == 2 else torch.stack(got)
        return self.rows


class OuterSteps(LocalSteps, _State):
    """Mixin: the schedule, the exchanges and the outer step of a local-step algorithm."""

    schedule: schedules.Schedule
    settings: QsparseSettings
    rng: "Generators"
    _plans: LayoutCache[MessagePlan]
    _workspaces: LayoutCache[list[torch.Tensor]]

    def _init_outer(self) -> None:
        self._in_flight: list[Flight] = []
        self._fragment_cache: tuple[tuple[int, ...], list[list[torch.Tensor]]] | None = None

    @property
    def _master_slot(self) -> str:
        return "master" if self.schedule.asynchronous else "x_last"

    def outer_slots(self) -> tuple[str, ...]:
        """The memory slots of the outer loop."""
        slots = ("memory", "x_last") + (("master",) if self.schedule.asynchronous else ())
        return slots + (("outer_momentum",) if self.settings.outer_momentum else ())

    def start_outer(self) -> None:
        """At attach: the global model (and every worker's last pulled one) is the initial model."""
        for p in self.served_params():
            for slot in ("x_last", self._master_slot):
                if self.memory.get(slot, p) is None:
                    self.memory.set(slot, p, p)

    # ---- the schedule ---------------------------------------------------------------------------
    def synchronize_at(self, t: int, step: int) -> bool:
        moved = False
        for flight in [f for f in self._in_flight if f.land == t]:
            self._in_flight.remove(flight)
            self._land(flight, step)
            moved = moved or self.rank in flight.workers
        for fragment, workers in self._due(t):
            flight = self._send(fragment, workers, t + self.settings.delay, step)
            if self.settings.delay:
                self._in_flight.append(flight)
            else:
                self._land(flight, step)
                moved = moved or self.rank in workers
        return moved

    def _due(self, t: int) -> list[tuple[int, list[int]]]:
        n = self.world_size
        if self.schedule.asynchronous:
            workers = self.schedule.due(t, n)
            return [(0, workers)] if workers else []
        every = list(range(n))
        return [
            (f, every)
            for f in range(self.settings.fragments)
            if schedules.staggered(t, f, self.settings.fragments, self.settings.period)
        ]

    def _fragment(self, index: int) -> list[torch.Tensor]:
        """The parameters of fragment ``index`` this rank serves. Fragments are cut from the
        whole model, so that a worker of several ranks streams the same fragments."""
        served = self.served_params()
        if self.settings.fragments == 1:
            return served
        key = tuple(id(p) for p in served)
        if self._fragment_cache is None or self._fragment_cache[0] != key:
            view = self.model_view()
            model = view.params
            if len(model) < self.settings.fragments:
                raise ValueError(
                    f"fragments={self.settings.fragments} needs as many parameter tensors; the model has {len(model)}"
                )
            mine = set(key)
            sizes = [view.handle(p).numel() for p in model]  # whole tensors, also where sharded
            groups = [[model[i] for i in g] for g in schedules.fragments(sizes, self.settings.fragments)]
            self._fragment_cache = (key, [[p for p in g if id(p) in mine] for g in groups])
        return self._fragment_cache[1][index]

    # ---- one exchange ---------------------------------------------------------------------------
    def _send(self, fragment: int, workers: list[int], land: int, step: int) -> Flight:
        params = self._fragment(fragment)
        if not params:  # this rank serves none of it, nor does any peer of its exchange
            return Flight(land, fragment, workers, [], None)
        plan = self._plans.get(params, step)
        candidate, _ = self._workspaces.get(params, step)
        error, local = None, None
        if self.rank in workers:
            self.before_send(params)
            memory = self.memory.flat("memory", params)
            last = self.memory.flat("x_last", params)
            numels = [p.numel() for p in params]
            with torch.no_grad(), self.time(step, "compress", last.device):
                progress = [x0 - p.detach().reshape(-1) for x0, p in zip(last.split(numels), params)]  # x_last - x
                torch.mul(memory, self.settings.error_decay, out=candidate)  # beta mem (exact when beta = 1)
                payload, local = plan.encode_ef(progress, candidate.split(numels), (self.rng.own, self.rng.shared))
            self.count_bits(step, plan.paper_bits)
            error = candidate
        else:
            payload = torch.empty(plan.nbytes, dtype=torch.uint8, device=candidate.device)
        summed = len(workers) == self.world_size and plan.summable
        if summed:  # fp32 pseudo-gradients add up: an all-reduce, not an all-gather
            rows = [self.transport.all_reduce(payload.view(torch.float32), step)]
        elif len(workers) == self.world_size:
            rows = [self.transport.all_gather(payload, step)]
        else:
            rows = [
                self.transport.broadcast(payload if j == self.rank else torch.empty_like(payload), j, step)
                for j in workers
            ]
        return Flight(land, fragment, workers, rows, error, local=local, summed=summed)

    def before_send(self, params: list[torch.Tensor]) -> None:
        """This worker's work before it sends ``params``' progress (override)."""

    def _land(self, flight: Flight, step: int) -> None:
        params = self._fragment(flight.fragment)
        if not params:
            return
        plan = self._plans.get(params, step)
        _, mean = self._workspaces.get(params, step)
        numels = [p.numel() for p in params]
        master = self.memory.flat(self._master_slot, params)
        rows, error = flight.arrived(), flight.error
        with torch.no_grad(), self.time(step, "decompress", master.device):
            if flight.summed:
                bad = plan.mean_of_sum(rows, mean.split(numels), self.world_size)
            else:
                bad = plan.mean(rows, mean.split(numels), flight.local, divisor=self.world_size)
            if error is not None:
                keep_unless(bad, self.memory.flat("memory", params), error)  # mem = Delta - q
            add_unless(bad, master, self._outer_step(params, mean, bad), alpha=-self.settings.outer_lr)
            if self.rank not in flight.workers:
                return
            if self.schedule.asynchronous:
                self.memory.flat("x_last", params).copy_(master)
            for p, piece in zip(params, master.split(numels)):
                if self.settings.delay:  # the late average mixed with the local progress made meanwhile
                    mixed = torch.lerp(piece.view_as(p), p.detach().float(), self.settings.mix)
                    piece = torch.where(bad, piece.view_as(p), mixed)
                p.copy_(piece.view_as(p))

    def _outer_step(self, params: list[torch.Tensor], mean: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """The outer step's direction: ``Delta``, or with Nesterov momentum ``Delta + mu m``
        after ``m = mu m + Delta`` (``m`` unchanged when ``bad``)."""
        if not self.settings.outer_momentum:
            return mean
        momentum = self.memory.flat("outer_momentum", params)
        keep_unless(bad, momentum, momentum * self.settings.outer_momentum + mean)
        return mean + self.settings.outer_momentum * momentum

    # ---- checkpoints ----------------------------------------------------------------------------
    def flights_state_dict(self) -> dict[str, Any]:
        """The exchanges in flight, with what arrived (waits for it)."""
        if not self.settings.delay:
            return {}
        saved = []
        for f in self._in_flight:
            error = None if f.error is None else f.error.detach().clone()
            rows = f.arrived().clone()
            where = {"land": f.land, "fragment": f.fragment, "workers": list(f.workers), "summed": f.summed}
            saved.append({**where, "rows": rows, "error": error})
        return {"in_flight": saved}

    def flights_problems(self, extra: Any) -> list[str]:
        if not self.settings.delay:
            return []
        flights = extra.get("in_flight")
        if not isinstance(flights, list) or len(flights) > self.settings.fragments:
            return [f"extra['in_flight'] must be a list of at most {self.settings.fragments} exchanges"]
        now = extra.get("local_steps")
        now = now if isinstance(now, int) else 0
        out = []
        for i, f in enumerate(flights):
            ok = (
                isinstance(f, dict)
                and all(isinstance(f.get(key), int) for key in ("land", "fragment"))
                and now < f["land"] <= now + self.settings.delay
                and 0 <= f["fragment"] < self.settings.fragments
                and f.get("workers") == list(range(self.world_size))
                and torch.is_tensor(f.get("rows"))
                and f["rows"].dtype == torch.uint8
                and f["rows"].dim() == 2
                and isinstance(f.get("summed", False), bool)
                and f["rows"].shape[0] == (1 if f.get("summed") else self.world_size)
                and (f.get("error") is None or (torch.is_tensor(f["error"]) and f["error"].dtype == torch.float32))
            )
            if not ok:
                out.append(f"extra['in_flight'][{i}] is not an exchange of this configuration")
        return out

    def load_flights_state_dict(self, extra: dict[str, Any]) -> None:
        device = self.model_view().params[0].device
        self._in_flight = [
            Flight(
                f["land"],
                f["fragment"],
                f["workers"],
                f["rows"].to(device),
                None if f["error"] is None else f["error"].to(device),
                summed=f.get("summed", False),
            )
            for f in extra.get("in_flight", [])
        ]
