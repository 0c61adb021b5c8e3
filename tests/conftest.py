import os

import pytest
from hypothesis import HealthCheck, settings

# CI draws a fixed set of examples so a red run is reproducible; locally, explore.
settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("LORAZOO_HYPOTHESIS", "ci" if os.environ.get("CI") else "dev"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from lorazoo.testing import MERGE_BYTES, STATS

    if STATS:
        rows = ", ".join(f"{k} {v:.2f}" for k, v in sorted(STATS.items()))
        terminalreporter.write_line(f"largest merged-vs-unmerged error / (u_s·M) per dtype: {rows}")
    if MERGE_BYTES:
        rows = ", ".join(f"{k} {v:.3f}" for k, v in sorted(MERGE_BYTES.items()))
        terminalreporter.write_line(f"largest bytes held per merged element (excluding wide entries): {rows}")
