"""The files persona-chat ships besides its modules: the recipes in `configs/` and the ConvAI2 `evaluate` metric
(`metrics/convai2/`). In a source checkout they sit beside the modules; a wheel carries them as the data of the
`persona_assets_data` package (setup.cfg maps the two folders into it), installed beside the modules. The same
names find them in both.

>>> os.path.relpath(find_shipped("configs/gpt2.yaml"), find_shipped("configs"))
'gpt2.yaml'
>>> find_shipped("configs/no-such-recipe.yaml") is None
True
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_PACKAGE = "persona_assets_data"
# The installed package first: beside the modules of an install, another distribution may have left a `configs/`.
ROOTS = (os.path.join(HERE, DATA_PACKAGE), HERE)


def find_shipped(relative: str) -> str | None:
    """The path of the shipped file or folder `relative` (``configs/gpt2.yaml``, ``metrics/convai2``), or None."""
    if os.path.isabs(relative):
        return None
    relative = os.path.normpath(relative)
    if relative.split(os.sep, 1)[0] not in ("configs", "metrics"):
        return None
    return next((path for root in ROOTS if os.path.exists(path := os.path.join(root, relative))), None)


def shipped_config(path: str) -> str | None:
    """The shipped recipe a config path names when no such file is here: ``configs/gpt2.yaml`` run from outside a
    checkout is the recipe installed with persona-chat. None for a file that exists or that nothing ships."""
    if os.path.lexists(path) or os.path.normpath(path).split(os.sep, 1)[0] != "configs":
        return None
    found = find_shipped(path)
    return found if found is not None and os.path.isfile(found) else None


# The `evaluate` module with the same F1, Hits@k and C-score as persona-eval: `evaluate.load(CONVAI2_METRIC_PATH)`.
CONVAI2_METRIC_PATH = find_shipped("metrics/convai2") or os.path.join(HERE, "metrics", "convai2")
