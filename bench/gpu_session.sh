#!/usr/bin/env bash
# Issue 4's GPU measurements in as few device calls as possible (bench/NOTES.md, "Next, on a GPU").
#
# Here, once (the GPU image lacks only segment-anything among what these steps import):
#     bash bench/gpu_session.sh fetch-wheels            # -> .whl/ (git-ignored)
# On the lent GPU, one device call per step, each well inside the 10-minute limit:
#     run(command="bash bench/gpu_session.sh tests decoder", carry=[".whl"])
#     run(command="bash bench/gpu_session.sh bench", carry=[".whl"])
# On a CPU, to check this script itself in seconds:
#     OUT=/tmp/gpu-session SMOKE=1 bash bench/gpu_session.sh tests decoder bench
#
# Everything lands in $OUT: machine.txt, tests.log, decoder.jsonl, bench.log and the bench
# report (results/<device>/<date>.json|md|png, two folders down so the device tool returns it).
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "$1" = fetch-wheels ]; then
    # the device's python is 3.12; pip fetches from here, nothing is fetched there
    exec $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "segment-anything==1.0"
fi

OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || echo "no nvidia-smi"
    $PY -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} >> "$OUT/machine.txt"

if [ -n "$SMOKE" ]; then
    DECODER_ARGS="--config tiny --n 4,16 --repeats 2"
    BENCH_ARGS="--smoke"
else
    DECODER_ARGS="--config cellsam-vit-b --n 256,1024,3500 --fp16 --repeats 5"
    # onnxruntime on the image is CPU-only, minutes per row at ViT-B size: torch only here
    BENCH_ARGS="--config cellsam-vit-b --n 1,10,100,500,1000,2000,3500 --backends torch-fp32,torch-fp16
                --cap baseline=1000 --painter"
fi

status=0
for step in "$@"; do
    case $step in
        tests)  # the CUDA parity and fp16 accuracy tests, which skip on a CPU
            $PY -m pytest -q -rs tests/test_pipeline.py::test_cuda_matches_cpu \
                tests/test_accuracy.py::test_fp16_meets_the_design_bar 2>&1 | tee "$OUT/tests.log" || status=1 ;;
        decoder)  # SAM's batched call against BoxDecoder, fp32 and (on CUDA) fp16
            { $PY bench/bench_decoder.py $DECODER_ARGS \
                && if [ -z "$SMOKE" ]; then $PY bench/bench_decoder.py --config cellsam-vit-b --n 256,1024,3500 --repeats 5; fi
            } 2>&1 | tee "$OUT/decoder.jsonl" || status=1 ;;
        bench)
            $PY -m cellsam_trt.cli bench $BENCH_ARGS --out-dir "$OUT/results" 2>&1 | tee "$OUT/bench.log" || status=1 ;;
        *)
            echo "gpu_session.sh: unknown step '$step' (fetch-wheels | tests | decoder | bench)" >&2; exit 2 ;;
    esac
done
exit $status
