"""Roles and permissions: the one table that says who may do what on the unit.

``authorize(user, action)`` checks it per action (21 CFR 11.10(g)) and raises ``NotAuthorized``
naming the roles that would allow the action. ``admin`` manages accounts and nothing else, and
cannot be combined with another role, so whoever controls the accounts cannot also run
batches (separation of duties). A signature with meaning ``m`` needs ``sign.m``.

=================  ======================================================================
role               actions
=================  ======================================================================
operator           run.view, run.start, prompt.answer, sign.performed, run.hold,
                   run.pause, run.resume, alarm.acknowledge
supervisor         everything operator has + run.restart, run.stop, run.abort, run.reset,
                   sign.verified, alarm.shelve, records.read
qa                 run.view, records.read, sign.reviewed, sign.approved
engineer           run.view, devices.write, recipe.validate, recipe.simulate
admin              users.manage
=================  ======================================================================
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

from agent.auth.users import AuthError, User, UserError


class Role(enum.StrEnum):
    """A job on the unit; a user has one or more (admin always alone)."""

    OPERATOR = "operator"
    SUPERVISOR = "supervisor"
    QA = "qa"
    ENGINEER = "engineer"
    ADMIN = "admin"


class Action(enum.StrEnum):
    """Everything a person can ask of the unit that needs authority."""

    RUN_VIEW = "run.view"
    RUN_START = "run.start"
    RUN_HOLD = "run.hold"
    RUN_PAUSE = "run.pause"
    RUN_RESUME = "run.resume"
    RUN_RESTART = "run.restart"
    RUN_STOP = "run.stop"
    RUN_ABORT = "run.abort"
    RUN_RESET = "run.reset"
    PROMPT_ANSWER = "prompt.answer"
    ALARM_ACKNOWLEDGE = "alarm.acknowledge"
    ALARM_SHELVE = "alarm.shelve"
    SIGN_PERFORMED = "sign.performed"
    SIGN_VERIFIED = "sign.verified"
    SIGN_REVIEWED = "sign.reviewed"
    SIGN_APPROVED = "sign.approved"
    RECORDS_READ = "records.read"
    DEVICES_WRITE = "devices.write"
    RECIPE_VALIDATE = "recipe.validate"
    RECIPE_SIMULATE = "recipe.simulate"
    USERS_MANAGE = "users.manage"


class Meaning(enum.StrEnum):
    """What a signature means (11.50(a)(3)); signing needs ``sign.<meaning>``."""

    PERFORMED = "performed"
    VERIFIED = "verified"
    REVIEWED = "reviewed"
    APPROVED = "approved"


_OPERATOR = frozenset(
    {
        Action.RUN_VIEW,
        Action.RUN_START,
        Action.PROMPT_ANSWER,
        Action.SIGN_PERFORMED,
        Action.RUN_HOLD,
        Action.RUN_PAUSE,
        Action.RUN_RESUME,
        Action.ALARM_ACKNOWLEDGE,
    }
)
ROLE_PERMISSIONS: Mapping[Role, frozenset[Action]] = {
    Role.OPERATOR: _OPERATOR,
    Role.SUPERVISOR: _OPERATOR
    | {
        Action.RUN_RESTART,
        Action.RUN_STOP,
        Action.RUN_ABORT,
        Action.RUN_RESET,
        Action.SIGN_VERIFIED,
        Action.ALARM_SHELVE,
        Action.RECORDS_READ,
    },
    Role.QA: frozenset(
        {Action.RUN_VIEW, Action.RECORDS_READ, Action.SIGN_REVIEWED, Action.SIGN_APPROVED}
    ),
    Role.ENGINEER: frozenset(
        {Action.RUN_VIEW, Action.DEVICES_WRITE, Action.RECIPE_VALIDATE, Action.RECIPE_SIMULATE}
    ),
    Role.ADMIN: frozenset({Action.USERS_MANAGE}),  # separation of duties: no run commands
}
_ROLE_NAMES = frozenset(str(r) for r in Role)
ROLE_DESCRIPTIONS: Mapping[Role, str] = {
    Role.OPERATOR: "runs batches: start, answer prompts, hold/pause/resume, ack alarms",
    Role.SUPERVISOR: "operator + restart/stop/abort/reset, verifies, shelves alarms",
    Role.QA: "reviews and approves; reads every record",
    Role.ENGINEER: "writes device values, validates and simulates recipes",
    Role.ADMIN: "manages accounts only (never runs batches)",
}


class NotAuthorized(AuthError):
    """``user`` has no role allowing ``action``; ``roles_needed`` names the roles that do."""

    def __init__(self, user: User, action: Action | str) -> None:
        self.user = user.name
        self.action = str(action)
        self.roles_needed = roles_allowing(action)
        needed = " or ".join(self.roles_needed) or "no role"
        why = "the account is disabled" if user.disabled else f"that needs {needed}"
        super().__init__(
            f"user {user.name!r} (roles: {', '.join(user.roles) or 'none'}) may not "
            f"{self.action}; {why}"
        )


def roles_allowing(action: Action | str) -> list[str]:
    """The roles whose permissions include ``action``."""
    act = Action(action)
    return [str(role) for role, allowed in ROLE_PERMISSIONS.items() if act in allowed]


def permissions_of(user: User) -> frozenset[Action]:
    """Everything ``user``'s roles allow (unknown roles allow nothing)."""
    found: set[Action] = set()
    for role in user.roles:
        if role in _ROLE_NAMES:
            found |= ROLE_PERMISSIONS[Role(role)]
    return frozenset(found)


def can(user: User, action: Action | str) -> bool:
    """Whether ``user`` may do ``action`` (an enabled account is the caller's check)."""
    return Action(action) in permissions_of(user)


def authorize(user: User, action: Action | str) -> None:
    """Raise ``NotAuthorized`` unless ``user``'s roles allow ``action``; refuses disabled users."""
    if user.disabled or not can(user, action):
        raise NotAuthorized(user, action)


def sign_action(meaning: Meaning | str) -> Action:
    """The action a signature with ``meaning`` needs (``"verified"`` -> ``sign.verified``)."""
    return Action(f"sign.{Meaning(meaning)}")


def action_for_command(command: str) -> Action:
    """The action behind an ISA-88 procedure command (``"stop"`` -> ``run.stop``)."""
    return Action(f"run.{command.lower()}")


def check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """Known, non-empty roles, with ``admin`` alone (separation of duties)."""
    wanted = sorted({r.strip().lower() for r in roles})
    unknown = [r for r in wanted if r not in _ROLE_NAMES]
    if unknown or not wanted:
        known = ", ".join(Role)
        raise UserError(f"roles {unknown or wanted} not valid; give one or more of {known}")
    if Role.ADMIN in wanted and len(wanted) > 1:
        raise UserError("admin cannot be combined with other roles (separation of duties)")
    return tuple(wanted)
