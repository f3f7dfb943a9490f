"""Benchmarks: the speed harness (and the GPU device check), the tiny model's quality-speed curve, the
quantized-memory table, operator counts.

`dimple-bench` runs the speed harness (`benchmark.py`); `dimple-bench quality-speed ...` the quality-speed curve
(`quality_speed.py`, also `--suite length`: fixed canvases against open-ended decoding); `dimple-bench multi-turn
...` a second turn over the first turn's cache against re-encoding the conversation (`multi_turn.py`).
"""

import sys


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["quality-speed"]:
        from dimple_tools.bench.quality_speed import main as quality_speed

        quality_speed(argv[1:])
        return
    if argv[:1] == ["multi-turn"]:
        from dimple_tools.bench.multi_turn import main as multi_turn

        multi_turn(argv[1:])
        return
    from dimple_tools.bench.benchmark import main as benchmark

    benchmark(argv)
