"""Import the repository's remote-code modules as the package `dimple`.

The `.py` modules at the repository root use relative imports (as `trust_remote_code` requires), so
local scripts and tests import them through this alias: `import dimple_package; from dimple.modeling_dimple
import DimpleModel`.
"""

import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parent

if "dimple" not in sys.modules:
    _package = types.ModuleType("dimple")
    _package.__path__ = [str(ROOT)]
    sys.modules["dimple"] = _package
