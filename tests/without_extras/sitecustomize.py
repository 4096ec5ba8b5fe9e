"""Makes the optional packages unimportable (``PYTHONPATH=tests/without_extras``), as after a plain
``pip install -e .``: tests/test_errors.py runs the quickstart under it."""

import sys
from importlib.abc import MetaPathFinder

OPTIONAL = ("cityscapesscripts", "h5py", "pycocotools", "tensorboard")


class _Missing(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Missing())
