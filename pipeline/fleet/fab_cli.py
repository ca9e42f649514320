"""How `fab` reports a command line it cannot parse: exit 2, like every other usage error here.

invoke ends a `ParseError` (an unknown task, an unknown option such as `fab deploy --bogus`, a
flag missing its value) with exit code 1, which the project uses for "a host failed". The fabfile
calls `usage_errors_exit_2` on the program that loaded it, so a script can tell a typo from a
failed rollout. Only task-level parsing can be covered: invoke parses its own core options
(`fab --bogus`) before it loads the fabfile.
"""

from __future__ import annotations

from typing import Any

from invoke.exceptions import Exit, ParseError

USAGE_EXIT_CODE = 2


def usage_errors_exit_2(program: Any) -> None:
    """Make `program` (an invoke/fabric Program) end task-parsing errors with one line and exit 2.

    Idempotent: a program patched once is left alone.
    """
    original = program.parse_tasks
    if getattr(original, "_usage_exit_2", False):
        return

    def parse_tasks() -> None:
        try:
            original()
        except ParseError as e:
            hint = " (see `fab --list` and `fab --help TASK`)"
            raise Exit(f"error: {' '.join(str(e).split())}{hint}", code=USAGE_EXIT_CODE) from e

    parse_tasks._usage_exit_2 = True  # type: ignore[attr-defined]
    program.parse_tasks = parse_tasks
