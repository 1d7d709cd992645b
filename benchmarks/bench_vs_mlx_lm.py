"""`orthrus-mlx bench` as a script: Orthrus, our AR mode and mlx-lm, interleaved in one process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 \
        python benchmarks/bench_vs_mlx_lm.py --max-tokens 256 --block-sizes 4,8,16,32 \
        --json bench.json --plot bench.png

Takes every flag of `orthrus-mlx bench --help`.
"""

import sys

from orthrus_mlx.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
