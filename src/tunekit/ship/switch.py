"""Switching a served name to a new run without a restart (`tunekit serve --enable-switch`, then
`tunekit switch NAME RUN` or `POST /tunekit/switch`).

The retraining loop ends here: `tunekit train CONFIG --from OLD` trains NEW, `tunekit eval
--compare OLD NEW --gate` writes NEW/gate.json, and the switch puts NEW behind the name OLD is served
under, only if that gate found NEW fit to replace the very run served now (`force` skips the check,
and the answer says it was skipped). NEW is loaded in a turn of its own on the models (an adapter on
a base already in memory joins that model), then the name points at it: requests already running
finish on OLD, every later one gets NEW. OLD stays in memory until the server restarts.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunekit.ship.api import APIError, Served, Text, _find, _invalid

BAD = "invalid_request_error"


class SwitchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Text = Field(description="The served name to switch.")
    run: Text = Field(description="The run directory to serve under that name from now on.")
    force: bool = Field(False, strict=True, description="Switch without NEW's passing gate against OLD.")


def parse(body: bytes) -> SwitchRequest:
    try:
        return SwitchRequest.model_validate(json.loads(body))
    except ValidationError as e:
        raise _invalid(e) from None
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", BAD) from None


def gate_verdict(old: Path, new: Path) -> dict:
    """NEW's gate decision against OLD (NEW/gate.json), or a 409 saying what is missing."""
    gate_file = new / "gate.json"
    again = f"run `tunekit eval --compare {old} {new} --gate`, or switch with force"
    if not gate_file.is_file():
        raise APIError(409, f"{new} has no gate decision: {again}", BAD, "run", "gate_missing")
    try:
        result = json.loads(gate_file.read_text())
        judged = Path(result["old"]).resolve()
        fit, reason = bool(result["fit"]), str(result["reason"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise APIError(409, f"{gate_file} is unreadable ({e}): {again}", BAD, "run", "gate_missing") from None
    if judged != old.resolve():
        raise APIError(
            409,
            f"{new}'s gate judged it against {result['old']}, not {old} (served now): {again}",
            BAD,
            "run",
            "gate_mismatch",
        )
    if not fit:
        raise APIError(
            409, f"the gate found {new} not fit to replace {old}: {reason}", BAD, "run", "gate_failed"
        )
    return result


def check(served: dict[str, Served], req: SwitchRequest) -> tuple[Served, Path, dict | None]:
    """(what the name serves now, the new run, its gate decision or None when forced), or the
    APIError that refuses the switch."""
    old = _find(served, req.model)
    new = Path(req.run)
    if not (new / "config.yaml").is_file():
        raise APIError(400, f"run: {new} is not a run directory (no config.yaml in it)", BAD, "run")
    if new.resolve() == old.run_dir.resolve():
        raise APIError(400, f"run: {new} is what {old.name} serves already", BAD, "run")
    return old, new, None if req.force else gate_verdict(old.run_dir, new)


def commit(served: dict[str, Served], limits: dict, s: Served, old: Served, gate: dict | None) -> dict:
    """Point the name at the loaded run `s`; the answer body."""
    from tunekit.ship.api import _Limits

    limits[s.name] = _Limits(s)
    served[s.name] = s  # last: a request finds the new model only once its limits are there
    return {
        "object": "tunekit.switch",
        "model": s.name,
        "run": str(s.run_dir),
        "previous_run": str(old.run_dir),
        "gate": gate["reason"] if gate else "not checked (force)",
    }
