"""Everything around the Dimple checkpoint: demos, training, the tiny shapes task and model, benchmarks.

The checkpoint's own code is the package `dimple` (the repository root's remote-code modules); these tools
import it, never the other way round.
"""
