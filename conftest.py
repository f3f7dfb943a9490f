# Makes `import dimple.modeling_dimple` work in tests (see dimple_package.py).
import dimple_package  # noqa: F401
