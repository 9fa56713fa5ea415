import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DIMSCOPE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow reproduction: set DIMSCOPE_SLOW=1 (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
