#!/usr/bin/env bash
# One short check of t5x_lite on one GPU (written for one NVIDIA H200, 141 GB, 16 CPU cores), in under 8 minutes:
#   1. python3 has JAX and it sees a GPU (else it stops, saying so);
#   2. the other packages the checks import (flax, optax, gin-config, pytest) are there, or are installed from
#      the wheels in $WHEELHOUSE (pip --no-index: the machine needs no network; scripts/make_wheelhouse.sh builds
#      it), with jax, jaxlib, its CUDA plugins, numpy and ml_dtypes held at the versions already installed;
#   3. the unit tests that matter on a GPU and need no tensorflow: the network, the trainer, decoding,
#      optimizers and losses, on the one GPU (the tests that need 8 devices are left out: test_partitioning.py
#      and three others, named below), float32 matmuls at full precision so that their CPU tolerances hold;
#   4. scripts/benchmark.py on T5.1.1-XL (2.85B parameters), bfloat16 activations, Adafactor, remat 'minimal',
#      scanned layers (a short compile), batch 64 x 512/114, MFU against the H200's dense bf16 peak of
#      989 TFLOP/s; an out-of-memory batch is tried once more at half the size while time allows.
# It prints a summary and exits non-zero when a step failed. Logs and the benchmark's JSON go to $GPU_CHECK_OUT
# (default $OUT when set, else /tmp/gpu_check).
#
#   WHEELHOUSE=wheelhouse scripts/gpu_check.sh
#   GPU_CHECK_BATCH=32 GPU_CHECK_REMAT=none scripts/gpu_check.sh          # another batch size / remat policy
#   GPU_CHECK_ALLOW_CPU=1 scripts/gpu_check.sh                              # dry run on a CPU: tiny model, few tests
#
# Settings (environment): PYTHON (python3), WHEELHOUSE, GPU_CHECK_BATCH (64), GPU_CHECK_GIN
# (gin/models/t5_1_1/xl.gin), GPU_CHECK_REMAT (minimal), GPU_CHECK_SCAN (True), GPU_CHECK_LENGTHS (512/114),
# GPU_CHECK_STEPS (10), GPU_CHECK_PEAK_TFLOPS (989), GPU_CHECK_TESTS (test files / node ids), GPU_CHECK_TEST_TIMEOUT
# (210 s), GPU_CHECK_BENCH_TIMEOUT (240 s), GPU_CHECK_BUDGET (450 s: no retry that could end past it).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PYTHON=${PYTHON:-python3}
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT_DIR"
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
PEAK=${GPU_CHECK_PEAK_TFLOPS:-989}
REMAT=${GPU_CHECK_REMAT:-minimal}
SCAN=${GPU_CHECK_SCAN:-True}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-210}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-240}
BUDGET=${GPU_CHECK_BUDGET:-450}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
declare -a SUMMARY=()
FAILED=0
note() { echo "== [$((SECONDS - START))s] $*"; }
record() { SUMMARY+=("$(printf '%-12s %-5s %s' "$1" "$2" "$3")"); [ "$2" = ok ] || FAILED=1; }
finish() {
    echo
    echo "== gpu_check summary ($((SECONDS - START)) s; logs in $OUT_DIR)"
    printf '%s\n' "${SUMMARY[@]}"
    exit "$FAILED"
}

# 1. JAX and the GPU.
note "python: $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! DEVICES=$("$PYTHON" -c 'import jax; d = jax.devices(); print(jax.__version__, d[0].platform, len(d), d)' 2>&1)
then
    echo "$DEVICES" | tail -5
    echo "gpu_check: '$PYTHON -c \"import jax\"' failed: this script needs python3 with JAX's CUDA build (jax[cuda])." >&2
    exit 2
fi
read -r JAX_VERSION PLATFORM DEVICE_COUNT DEVICE_LIST <<<"$(echo "$DEVICES" | tail -1)"
note "jax $JAX_VERSION: $DEVICE_COUNT $PLATFORM device(s): $DEVICE_LIST"
if [ "$PLATFORM" = gpu ] || [ "$PLATFORM" = cuda ]; then
    DRY_RUN=0
    JAX_PLATFORM_NAME=cuda
elif [ "$ALLOW_CPU" = 1 ]; then
    DRY_RUN=1
    JAX_PLATFORM_NAME=cpu
    note "no GPU: GPU_CHECK_ALLOW_CPU=1, so a dry run on the CPU (tiny model, few tests, one device)"
else
    echo "gpu_check: JAX sees no GPU (jax.devices() = $DEVICE_LIST). Install JAX's CUDA build (jax[cuda12] or" \
         "jax[cuda13]) on a machine with an NVIDIA GPU, or set GPU_CHECK_ALLOW_CPU=1 for a dry run." >&2
    exit 2
fi
record jax ok "jax $JAX_VERSION, $DEVICE_COUNT x $PLATFORM"

# 2. The other packages, by distribution: 'import gin' alone would succeed here without gin-config, finding the
# repository's gin/ folder as a namespace package.
missing_distributions() {
    "$PYTHON" - flax optax gin-config numpy pytest <<'EOF'
import importlib.metadata, sys
for name in sys.argv[1:]:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        print(name)
EOF
}
MISSING=$(missing_distributions | sort | tr '\n' ' ')
if [ -n "${MISSING// }" ]; then
    if [ -z "${WHEELHOUSE:-}" ] || [ ! -d "${WHEELHOUSE:-}" ]; then
        echo "gpu_check: missing $MISSING; bring them as wheels: scripts/make_wheelhouse.sh on a machine with" \
             "internet, then WHEELHOUSE=<that folder> here (WHEELHOUSE=${WHEELHOUSE:-<unset>})." >&2
        record packages FAIL "missing: $MISSING"
        finish
    fi
    # Hold JAX (its CUDA build), numpy and ml_dtypes where they are: the wheelhouse must not replace them.
    "$PYTHON" -m pip list --format=freeze 2>/dev/null \
        | grep -iE '^(jax|jaxlib|jax[-_]cuda[0-9]+[-_](plugin|pjrt)|numpy|ml[-_]dtypes)==' >"$OUT_DIR/held.txt"
    note "installing $MISSING from $WHEELHOUSE (holding: $(tr '\n' ' ' <"$OUT_DIR/held.txt"))"
    # shellcheck disable=SC2086
    if ! "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" -c "$OUT_DIR/held.txt" $MISSING \
        >"$OUT_DIR/pip.log" 2>&1; then
        tail -20 "$OUT_DIR/pip.log"
        record packages FAIL "pip install from $WHEELHOUSE failed (log: $OUT_DIR/pip.log)"
        finish
    fi
    MISSING_AFTER=$(missing_distributions | tr '\n' ' ')
    if [ -n "${MISSING_AFTER// }" ]; then
        record packages FAIL "still missing after the install: $MISSING_AFTER"
        finish
    fi
    record packages ok "installed $MISSING from the wheelhouse"
else
    record packages ok "flax, optax, gin-config, numpy and pytest already there"
fi
"$PYTHON" -c 'import flax, optax, gin, numpy; print("flax", flax.__version__, "optax", optax.__version__, "numpy", numpy.__version__)'

# 3. Unit tests. The tests that need 8 devices (a 4 x 2 or 8 x 1 mesh) cannot run on one GPU: test_partitioning.py
# (all but two of its tests) and the three named here.
DESELECT=(
    "tests/test_trainer.py::test_microbatches_give_the_full_batch_update[mesh4x2]"
    "tests/test_decoding.py::test_sharded_predict_and_score_equal_single_device"
    "tests/test_decoding.py::test_predictor_rejects_a_batch_that_does_not_divide_the_data_axis"
)
if [ "$DRY_RUN" = 1 ]; then
    DEFAULT_TESTS="tests/test_losses.py tests/test_optimizers.py"
else
    DEFAULT_TESTS="tests/test_network.py tests/test_trainer.py tests/test_decoding.py tests/test_optimizers.py tests/test_losses.py"
fi
TESTS=${GPU_CHECK_TESTS:-$DEFAULT_TESTS}
PYTEST_ARGS=(-q -p no:cacheprovider -rfE --durations=10)
for node in "${DESELECT[@]}"; do PYTEST_ARGS+=(--deselect "$node"); done
if "$PYTHON" -c 'import xdist' 2>/dev/null && [ "$DRY_RUN" = 0 ]; then
    PYTEST_ARGS+=(-n 4 --dist=loadfile)  # 16 cores compile in parallel; the tests' models are small for one GPU.
fi
note "tests on $JAX_PLATFORM_NAME: $TESTS (timeout ${TEST_TIMEOUT}s)"
# JAX_PLATFORMS is set so that tests/conftest.py's CPU default does not apply; one device as on the GPU. Memory
# is allocated as needed, not preallocated (several processes share the GPU). float32 matmuls at full precision
# (no TF32): the tests' tolerances were written for the CPU's float32.
# shellcheck disable=SC2086
env JAX_PLATFORMS="$JAX_PLATFORM_NAME" XLA_FLAGS=--xla_force_host_platform_device_count=1 \
    XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
    timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" $TESTS 2>&1 | tee "$OUT_DIR/tests.log"
STATUS=${PIPESTATUS[0]}
TEST_LINE=$(grep -E '[0-9]+ (passed|failed|error)' "$OUT_DIR/tests.log" | tail -1)
if [ "$STATUS" = 0 ]; then
    record tests ok "$TEST_LINE"
elif [ "$STATUS" = 124 ]; then
    record tests FAIL "timed out after ${TEST_TIMEOUT}s ($TEST_LINE)"
else
    record tests FAIL "exit $STATUS: $TEST_LINE"
fi

# 4. The benchmark.
if [ "$DRY_RUN" = 1 ]; then
    GIN=${GPU_CHECK_GIN:-gin/models/t5_1_1/tiny.gin}
    BATCH=${GPU_CHECK_BATCH:-4}
    LENGTHS=${GPU_CHECK_LENGTHS:-64/16}
    STEPS=${GPU_CHECK_STEPS:-2}
else
    GIN=${GPU_CHECK_GIN:-gin/models/t5_1_1/xl.gin}
    BATCH=${GPU_CHECK_BATCH:-64}
    LENGTHS=${GPU_CHECK_LENGTHS:-512/114}
    STEPS=${GPU_CHECK_STEPS:-10}
fi
INPUTS_LENGTH=${LENGTHS%/*}
TARGETS_LENGTH=${LENGTHS#*/}
run_benchmark() {  # batch size -> exit status; log and JSON in $OUT_DIR
    local batch=$1
    note "benchmark: $GIN, batch $batch x $INPUTS_LENGTH/$TARGETS_LENGTH, bfloat16, remat $REMAT, scan $SCAN," \
         "$STEPS steps, peak $PEAK TFLOP/s (timeout ${BENCH_TIMEOUT}s)"
    # The benchmark is alone on the GPU: let it take 95% of the memory (JAX's default preallocation is 75%).
    env JAX_PLATFORMS="$JAX_PLATFORM_NAME" XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
        timeout "$BENCH_TIMEOUT" "$PYTHON" scripts/benchmark.py --gin_file="$GIN" \
        --gin_bindings="REMAT_POLICY = '$REMAT'" --gin_bindings="SCAN_LAYERS = $SCAN" --dtype=bfloat16 \
        --batch_size="$batch" --inputs_length="$INPUTS_LENGTH" --targets_length="$TARGETS_LENGTH" \
        --steps="$STEPS" --warmup=2 --peak_tflops="$PEAK" --json_out="$OUT_DIR/benchmark.json" \
        2>&1 | tee "$OUT_DIR/benchmark_b$batch.log"
    return "${PIPESTATUS[0]}"
}
BATCH_RUN=$BATCH
run_benchmark "$BATCH_RUN"
STATUS=$?
if [ "$STATUS" != 0 ] && [ "$BATCH_RUN" -gt 1 ] \
    && grep -qiE 'RESOURCE_EXHAUSTED|out of memory' "$OUT_DIR/benchmark_b$BATCH_RUN.log"; then
    if [ $((SECONDS - START + BENCH_TIMEOUT)) -le "$BUDGET" ]; then
        BATCH_RUN=$((BATCH_RUN / 2))
        note "out of memory at batch $BATCH: once more at batch $BATCH_RUN"
        run_benchmark "$BATCH_RUN"
        STATUS=$?
    else
        note "out of memory at batch $BATCH, and no time left in the ${BUDGET}s budget to try a smaller one"
    fi
fi
if [ "$STATUS" = 0 ]; then
    MFU=$("$PYTHON" - "$OUT_DIR/benchmark.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
memory = r["peak_device_memory_bytes"]
print("MFU %.1f%% of %.0f TFLOP/s, %.0f ms/step, %s tokens/s, device memory peak %s" % (
    100 * r["mfu"], r["peak_tflops_per_second"], 1e3 * r["step_seconds_median"], format(r["tokens_per_second"], ",.0f"),
    "n/a" if memory is None else "%.1f GiB" % (memory / 2**30)))
EOF
)
    record benchmark ok "$(basename "$GIN") batch $BATCH_RUN: $MFU"
elif [ "$STATUS" = 124 ]; then
    record benchmark FAIL "$(basename "$GIN") batch $BATCH_RUN: timed out after ${BENCH_TIMEOUT}s"
else
    record benchmark FAIL "$(basename "$GIN") batch $BATCH_RUN: exit $STATUS (log: $OUT_DIR/benchmark_b$BATCH_RUN.log)"
fi
finish
