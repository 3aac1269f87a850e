"""Issue 5's benchmark: packrnn's RNN layers vs torch.nn (padded and packed) on CPU.

    python benchmarks/bench_rnn.py [--configs all|lstm16,lstm64,lstm256,gru64,bilstm64]
                                   [--repeats 5] [--threads 2] [--no-memory]

Same as ``packrnn bench``; the protocol is documented in ``packrnn.bench``: training step
(forward + backward of output.sum()) and no_grad inference, lognormal lengths (median 40,
sigma 0.35, clamped to [5, 200], torch.manual_seed(0)), 2 threads, interleaved, best of
several; prints the ratios against the issue's goals, the FLOP/s efficiency against a 2048 x 2048
float32 matmul measured in the same run, and the peak memory of a training step.
"""

import sys

from packrnn.bench import main

if __name__ == "__main__":
    sys.exit(main())
