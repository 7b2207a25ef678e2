"""Traffic control: a public name (`orders`) sends each request to one served name by weight, shadows a candidate
(it answers too, only its log sees it), or runs a canary whose share grows while it stays healthy.

A caller stays on one arm (sticky by API key or by the request's `user`): its bucket is a hash of the route and the
caller, so the same caller lands in the same place on every replica and after a restart.
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass
from typing import Callable

from tunesmith.config import RouteConfig
from tunesmith.errors import TunesmithError
from tunesmith.serve.gateway.canary import CanaryChange, CanaryController, Outcome


@dataclass(frozen=True)
class RouteDecision:
    """Where one request goes: `arm` answers; `shadow`, when set, answers too and is only logged."""

    model: str
    """The name the client asked for."""
    arm: str
    route: str | None = None
    """The public route that chose the arm; None when the client named a served model itself."""
    shadow: str | None = None


class TrafficRouter:
    """Every configured route; `decide` picks the arm, `report` feeds canaries with how answers went."""

    def __init__(self, routes: dict[str, RouteConfig], on_change: Callable[[str, str, CanaryChange], None]
                 = lambda route, arm, change: None):
        self.routes = routes
        self.canaries = {name: CanaryController(route.canary_policy) for name, route in routes.items() if route.canary}
        self.on_change = on_change
        self._lock = threading.Lock()

    def resume(self, events: list[dict], version_of: Callable[[str], str | None]) -> list[str]:
        """Replay recorded canary changes (oldest first) whose route, candidate and candidate version are still the
        ones configured, so a restart neither forgets a rollback nor starts a healthy canary over; what resumed."""
        resumed = {}
        for event in events:
            route = self.routes.get(event.get("route"))
            if (route is None or event.get("arm") != route.canary
                    or event.get("version") != version_of(route.canary)):
                continue  # another route, candidate or version now: its canary starts fresh
            with self._lock:
                self.canaries[event["route"]].resume(event.get("kind"), event.get("share"))
            resumed[event["route"]] = f"route {event['route']}: canary {route.canary} resumed ({event.get('kind')}, " \
                                      f"{self.canaries[event['route']].share:g}% of traffic)"
        return list(resumed.values())

    def check_served(self, served: list[str]) -> None:
        """Every arm must be served and no route may take a served name."""
        for name, route in self.routes.items():
            if name in served:
                raise TunesmithError(f"serve.routes.{name}: {name!r} is a served model's name already; "
                                     "give the route a name of its own")
            missing = [arm for arm in route.arms() if arm not in served]
            if missing:
                raise TunesmithError(f"serve.routes.{name}: {', '.join(missing)} is not served; add it to "
                                     f"serve.models (served now: {', '.join(served)})")

    def decide(self, model: str, sticky_key: str | None, user: str | None) -> RouteDecision:
        route = self.routes.get(model)
        if route is None:
            return RouteDecision(model, model)
        caller = {"key": sticky_key, "user": user or sticky_key, "none": None}[route.sticky]
        bucket = _bucket(model, caller)
        if route.split:
            total, edge = sum(route.split.values()), 0.0
            for arm, weight in route.split.items():
                edge += 100.0 * weight / total
                if bucket < edge:
                    return RouteDecision(model, arm, model)
            return RouteDecision(model, arm, model)  # rounding: the last arm
        if route.shadow:
            return RouteDecision(model, route.primary, model, shadow=route.shadow)
        with self._lock:
            share = self.canaries[model].share
        return RouteDecision(model, route.canary if bucket < share else route.primary, model)

    def report(self, decision: RouteDecision, outcome: Outcome) -> None:
        """How the chosen arm's answer went; a canary may step up or roll back on it."""
        if decision.route not in self.canaries:
            return
        route = self.routes[decision.route]
        with self._lock:
            change = self.canaries[decision.route].record(decision.arm == route.canary, outcome)
        if change is not None:
            self.on_change(decision.route, route.canary, change)

    def canary_shares(self) -> dict[tuple[str, str], float]:
        """(route, candidate) -> the candidate's share now, percent."""
        with self._lock:
            return {(name, self.routes[name].canary): c.share for name, c in self.canaries.items()}

    def json_checked(self, model: str) -> bool:
        """Whether answers on this route are checked as JSON (a canary judges JSON validity)."""
        route = self.routes.get(model)
        return bool(route and route.canary and route.canary_policy.max_json_validity_drop is not None)


def _bucket(route: str, caller: str | None) -> float:
    """[0, 100): stable for a caller on a route, random without one."""
    if caller is None:
        return random.random() * 100
    digest = hashlib.sha256(f"{route}\0{caller}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100
