"""Every CPU route names the committed benchmark result it was decided by (issue: route by measurement): the results
file exists in the checkout, so `fastcnn info` never points at a number nobody can read."""
import os

import pytest

import fastcnn  # noqa: F401  (imports every op and module route table)
from fastcnn.ops._dispatch import MODULE_TABLES, TABLES, UNMEASURED

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_ENTRIES = [(name, entry) for name, table in {**TABLES, **MODULE_TABLES}.items() for entry in table.routes
               if entry.device == "cpu"]


def test_there_are_cpu_routes():
    assert {"conv2d_relu_pool", "conv_transpose2d_act", "residual block"} <= {name for name, _ in CPU_ENTRIES}


@pytest.mark.parametrize("name,entry", CPU_ENTRIES, ids=[f"{n}-{e.backend}-{e.mode}-{e.size}" for n, e in CPU_ENTRIES])
def test_cpu_route_names_a_committed_result(name, entry):
    assert entry.measured != UNMEASURED, f"{name}: CPU route to {entry.backend} has no measurement"
    path, _, row = entry.measured.partition("#")
    assert row, f"{name}: {entry.measured} names no row"
    assert os.path.isfile(os.path.join(REPO, path)), f"{name}: {path} is not in the checkout"
