"""Exit codes of the device CLI, a contract with the fleet (pipeline/fleet reads them)."""

from __future__ import annotations

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2  # 2: usage or environment error, one line on stderr naming the fix


class UsageError(ValueError):
    """Bad command-line arguments."""
