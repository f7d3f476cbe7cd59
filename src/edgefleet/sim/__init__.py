"""``edgefleet sim``: a fleet of virtual devices in one process, running the real agent's enrollment,
HTTP client, TUF verification and update machine against a real server, with a cost model in place of
the models (docs/sim.md).

::

    from edgefleet.sim import Behaviour, SimFleet

    with SimFleet(url, token, 50, broker="mqtt://127.0.0.1:1883",
                  behaviour=Behaviour(slow={"2.0.0": 2.0}, fail={"3.0.0": 1.0})) as fleet:
        fleet.wait(lambda snap: all(s["running"].get("digits") == "2.0.0" for s in snap), 60)
        print(fleet.summary())
"""

from edgefleet.sim.behaviour import Behaviour, parse_overrides
from edgefleet.sim.fleet import SimFleet, default_updates

__all__ = ["Behaviour", "SimFleet", "default_updates", "parse_overrides"]
