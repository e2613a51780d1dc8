"""Times cached decoding (greedy and beam search) of a gin-configured model with random parameters.

    python scripts/decode_benchmark.py --gin_file=gin/models/t5_1_1/small.gin \
        --batch_sizes=8,32 --decoders=greedy,beam_search --num_beams=4 --inputs_length=512 --max_decode_length=64

Each configuration is compiled once (timed apart), run `--warmup` times untimed and `--repeats` times timed (the
median is reported). Inputs are random token rows in [2, vocab) without padding, and no id ends a sequence
(eos_id = -1), so every run decodes exactly max_decode_length tokens per example: throughput = batch x
max_decode_length / seconds (the beams of beam search are not counted as tokens, only each example's output).
Only jax, flax and gin are imported (no tensorflow, no seqio).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from t5x_lite import decoding, partitioning  # noqa: E402
from t5x_lite import predictor as predictor_lib  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", required=True, help="model gin file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    parser.add_argument("--batch_sizes", default="8,32", help="comma-separated batch sizes")
    parser.add_argument("--decoders", default="greedy,beam_search", help="comma-separated: greedy, beam_search")
    parser.add_argument("--num_beams", type=int, default=4)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--max_decode_length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after compilation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json_out", default=None, help="append one JSON line per configuration here")
    return parser.parse_args(argv)


def build_model(gin_files, gin_bindings):
    gin.add_config_file_search_path(os.path.join(REPO_ROOT, "gin"))
    gin.parse_config_files_and_bindings(gin_files, gin_bindings)
    return gin.query_parameter("%MODEL").scoped_configurable_fn()


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    model = build_model(args.gin_file, args.gin_bindings)
    partitioner = partitioning.Partitioner()  # every device data-parallel
    params = predictor_lib.Predictor(model, partitioner).init_params(args.seed)
    rng = np.random.default_rng(args.seed)
    results = []
    for decoder in args.decoders.split(","):
        config = decoding.DecodingConfig(decoder=decoder, num_beams=args.num_beams,
                                         max_decode_length=args.max_decode_length)
        predictor = predictor_lib.Predictor(model, partitioner, decoding_config=config, eos_id=-1)
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            inputs = rng.integers(2, model.config.vocab_size, (batch_size, args.inputs_length), dtype=np.int32)
            batch = {"encoder_input_tokens": inputs}
            start = time.perf_counter()
            jax.block_until_ready(predictor.predict(params, batch))
            first_call = time.perf_counter() - start
            for _ in range(args.warmup):
                jax.block_until_ready(predictor.predict(params, batch))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                tokens, _ = predictor.predict(params, batch)
                jax.block_until_ready(tokens)
                times.append(time.perf_counter() - start)
            assert tokens.shape == (batch_size, args.max_decode_length)
            seconds = statistics.median(times)
            result = {
                "model": os.path.basename(args.gin_file[-1]), "decoder": decoder if decoder != "beam_search" else f"beam {args.num_beams}",
                "batch_size": batch_size, "inputs_length": args.inputs_length, "decoded_tokens": args.max_decode_length,
                "seconds": seconds, "tokens_per_second": batch_size * args.max_decode_length / seconds,
                "compile_and_first_call_seconds": first_call, "devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
                "load_average_1min": os.getloadavg()[0],
            }
            results.append(result)
            print(f"{result['model']:<10} {result['decoder']:<8} batch {batch_size:>3}: {seconds:8.3f} s, "
                  f"{result['tokens_per_second']:9.1f} tokens/s (compile + first call {first_call:.1f} s, "
                  f"load {result['load_average_1min']:.1f})", flush=True)
            if args.json_out:
                with open(args.json_out, "a") as f:
                    f.write(json.dumps(result) + "\n")
    return results


if __name__ == "__main__":
    main()
