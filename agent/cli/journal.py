"""``bedside verify`` and ``bedside export``: the auditor's offline tools.

``verify`` trusts only the key it is given (``--public-key``, or ``--key-file`` such as the
``unit.pub`` registered at enrolment) and prints where that key came from, the anchor and the
covered range, so that a faked prune or an attacker's key cannot pass unseen. It exits 0 only
when every record is covered by a checkpoint signed with that key (or, with
``--allow-unsealed``, everything up to the last checkpoint, for a live journal), 1 when the
journal does not verify, 2 when it cannot be read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from agent.cli.common import fail

KEY = typer.Option(None, "--public-key", help="the unit's enrolled public key (base64 or hex)")
KEY_FILE = typer.Option(
    None, "--key-file", help="a file holding the enrolled public key (the unit.pub of enrolment)"
)


def verify(
    path: Path = typer.Argument(..., help="a journal file (journal.db) or an export"),
    public_key: str = KEY,
    key_file: Path = KEY_FILE,
    allow_unsealed: bool = typer.Option(
        False, "--allow-unsealed", help="accept records after the last checkpoint (live journal)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object"),
) -> None:
    """Verify a journal or an export offline with the enrolled key; names the first record
    that is not covered by a signature of that key, and why."""
    from agent.journal.files import verify_path
    from agent.record.format import JournalError
    from agent.record.keys import PublicKey, load_public_key

    if (public_key is None) == (key_file is None):
        fail(
            "give the unit's enrolled public key: --public-key KEY or --key-file unit.pub "
            "(exactly one; the keys a journal names for itself prove nothing)"
        )
    try:
        if key_file is not None:
            key, source = load_public_key(key_file), f"--key-file {key_file}"
        else:
            key, source = PublicKey.parse(public_key), "--public-key"
        report = verify_path(path, key, key_source=source, allow_unsealed=allow_unsealed)
    except (JournalError, ValueError) as exc:
        fail(str(exc))
    summary: dict[str, Any] = {
        "ok": report.ok,
        "file": str(path),
        "scope": report.scope,
        "unit": report.unit,
        "key_source": report.key_source,
        "trusted_keys": list(report.trusted),
        "signed_by": list(report.signed_by),
        "rotations": [list(r) for r in report.rotations],
        "anchor_seq": report.anchor_seq,
        "anchor": report.anchor_proof,
        "records": report.count,
        "first_seq": report.first_seq,
        "head_seq": report.head_seq,
        "sealed_to": report.sealed_to,
        "unsealed": report.unsealed,
        "checkpoints": report.checkpoints,
        "signatures": report.signatures,
        "first_bad": report.first_bad,
        "reason": report.reason,
    }
    if report.run_ended is not None or report.scope.startswith("run"):
        summary["run_ended"] = report.run_ended
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        _print(summary)
    if not report.ok:
        raise typer.Exit(1)


def _print(s: dict[str, Any]) -> None:
    verdict = "VERIFIED" if s["ok"] else "NOT VERIFIED"
    lines = [
        f"{verdict}: {s['file']} ({s['scope']} of unit {s['unit']})",
        f"  key:       {', '.join(s['trusted_keys'])} from {s['key_source']}; "
        f"checkpoints signed by {', '.join(s['signed_by']) or 'no key'}",
        f"  anchor:    records before {s['anchor_seq'] + 1} absent: {s['anchor']}",
        f"  records:   {s['records']} ({s['first_seq']}-{s['head_seq']}), "
        f"{s['checkpoints']} checkpoints, {s['signatures']} e-signatures bound",
        f"  covered:   up to record {s['sealed_to']}; unsealed: {s['unsealed']} records",
    ]
    for seq, old, new in s["rotations"]:
        lines.append(f"  rotation:  record {seq} hands the chain from key {old} to {new}")
    if "run_ended" in s:
        lines.append(f"  run:       ended {s['run_ended'] or 'not yet (still running)'}")
    if not s["ok"]:
        lines.append(f"  first bad: record {s['first_bad']}: {s['reason']}")
    typer.echo("\n".join(lines))


def export(
    run: str = typer.Argument(None, help="the run (batch) id; omit with --all"),
    journal: Path = typer.Option(
        Path(".bedside/journal.db"), "--journal", help="the unit's journal file"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="the export file to write"),
    whole: bool = typer.Option(False, "--all", help="export the whole journal instead of a run"),
) -> None:
    """Write a self-contained, verifiable export of a run (or of the whole journal): check it
    with `bedside verify FILE --public-key KEY`."""
    from agent.journal.files import export as export_journal
    from agent.journal.files import export_run
    from agent.record.format import JournalError

    if whole == (run is not None):
        fail("give a RUN id, or --all for the whole journal (not both)")
    try:
        count = export_journal(journal, out) if whole else export_run(journal, run, out)
    except JournalError as exc:
        fail(str(exc))
    what = "the whole journal" if whole else f"run {run}"
    typer.echo(f"exported {what}: {count} records to {out}")
