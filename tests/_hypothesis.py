"""Hypothesis where it is installed: ``given``, ``st``, ``assume``. Without it (e.g. on the offline GPU machine) a
test decorated with ``given`` is collected and skipped, so a test file keeps running its other tests."""
import pytest

try:
    from hypothesis import assume, given
    from hypothesis import strategies as st
except ImportError:
    class _NoStrategies:
        """Stands in for hypothesis.strategies while the decorators run; the skipped tests never draw."""

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    st = _NoStrategies()

    def assume(condition):
        return condition

    def given(*args, **kwargs):
        return pytest.mark.skip(reason="hypothesis is not installed")

__all__ = ["assume", "given", "st"]
