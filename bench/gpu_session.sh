#!/usr/bin/env bash
# The GPU measurements of bench/NOTES.md ("Next, on a GPU") and the CUDA tests, in as few
# commands as possible, each step degrading row by row instead of stopping.
#
# Here, once (the GPU image lacks segment-anything and platformdirs among what these steps
# import; the torch step also needs the released code, whose sample image it segments):
#     bash bench/gpu_session.sh fetch-wheels            # -> .whl/ (git-ignored)
#     RELEASED=~/src/cellSAM bash bench/gpu_session.sh fetch-released   # -> .released/
# On the GPU host, in one command of under 10 minutes (every step has its own time limit,
# so a slow step cannot take the rest down; steps whose limits add up to more than BUDGET,
# 590 s, are refused before any work):
#     bash bench/gpu_session.sh tests torch bench       # CUDA tests, torch switches, latency
#     bash bench/gpu_session.sh decoder                 # the decoder alone (another command)
#     bash bench/gpu_session.sh preprocess stages       # device preprocessing, one call's stages
#     bash bench/gpu_session.sh tests encoders preprocess   # precisions end to end, SDPA against flash
#     STAGES_VARIANTS="fp32/flash bf16/flash" bash bench/gpu_session.sh stages   # a subset of the stage tables
# On a CPU, to check this script itself in about two minutes (it simulates an
# out-of-memory row in the decoder step and in the bench, which must be reported):
#     OUT=/tmp/gpu-session SMOKE=1 bash bench/gpu_session.sh tests decoder bench
#
# Everything lands in $OUT: machine.txt, summary.txt (one line per step and per failed
# row), tests.log, torch.log with torch-switches.json|md, profile-fp32|fp16.md with their
# traces (.json), decoder.jsonl, decoder.log,
# interactive.json|md, stack.json, preprocess.json|log, stages-<precision>-<attention>.json|log,
# results-encoders/ (the encoders step's report), bench.log and the bench report (results/<device>/<date>.json|md|png, two folders down).
#
# Exit status: 0 when every step ran to its end, rows that ran out of memory or whose
# backend is missing (TensorRT, onnxruntime-gpu) included: they are listed in summary.txt
# and in the report. 1 when a step failed (a test failed, a script crashed, a step ran out
# of time).
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "$1" = fetch-wheels ]; then
    # the device's python is 3.12; pip fetches from here, nothing is fetched there
    exec $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "segment-anything==1.0" "platformdirs>=3" \
        kornia kornia_rs  # the released code (torch step) imports kornia
fi
if [ "$1" = fetch-released ]; then
    # the released package and the sample image the torch step segments (under 1 MB)
    src=${RELEASED:?set RELEASED to a vanvalenlab/cellSAM checkout}
    mkdir -p .released/sample_imgs && cp -r "$src/cellSAM" .released/ && cp "$src/sample_imgs/tissuenet.png" .released/sample_imgs/
    exit
fi

OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
RELEASED=${RELEASED:-.released}
if [ -n "$SMOKE" ]; then
    # ViT-B even here (the released code builds nothing smaller), on a 128 x 128 crop
    TORCH_ARGS="--device cpu --crop 128 --modes released,torch --torch-variants eager --rounds 1 --calls 1 --no-cold
                ${CHECKPOINT:+--checkpoint $CHECKPOINT}"
    DECODER_FP16_ARGS=""
    DECODER_FP32_ARGS="--config tiny --n 4,16 --repeats 2 --device cpu --formulations sam_repeat,shared,fused"
    PROFILE_ARGS="--config tiny --n 16 --device cpu --calls 2"
    BENCH_ARGS="--smoke"
    STACK_ARGS="--frames 2 --side 128 --rounds 1 --batch-size 2"
    INTERACTIVE_ARGS="--device cpu --on-screen 0,10 --repeats 2"
    STAGES_ARGS="--config tiny --device cpu --size 256"
    STAGES_VARIANTS=${STAGES_VARIANTS:-"fp32/sdpa bf16/sdpa"}
    ENCODERS_ARGS="--smoke --backends torch-fp32,torch-bf16,torch-fp32-flash"
    PREPROCESS_ARGS="--device cpu --sizes 256 --repeats 2 --labels --config tiny"
    # one row of each kind runs out of memory, as SAM's decoder call at N = 3500 does on an
    # 80 GB GPU: the steps must report it and go on
    export CELLSAM_TRT_BENCH_SIMULATE_OOM=${CELLSAM_TRT_BENCH_SIMULATE_OOM-decoder/sam_repeat/16,torch-fp32/user/10}
    LIMIT_TESTS=600 LIMIT_SUITE=1200 LIMIT_DECODER=300 LIMIT_BENCH=600 LIMIT_TORCH=900
else
    # seconds: "tests torch bench" stays under 10 minutes even when every step uses all of its time
    # and the grace to stop
    LIMIT_TESTS=${LIMIT_TESTS:-100} LIMIT_SUITE=${LIMIT_SUITE:-540} LIMIT_DECODER=${LIMIT_DECODER:-240}
    LIMIT_TORCH=${LIMIT_TORCH:-315} LIMIT_BENCH=${LIMIT_BENCH:-130}
    # every torch switch on the 512 x 512 tissue crop, CellFinder path, each configuration in
    # its own process after the released per-box loop on the same GPU; a configuration that
    # fails, passes 150 s or would start after the step's budget is a row of the report.
    # (default segment() is torch fp32 on a GPU host without TensorRT or onnxruntime-gpu.)
    TORCH_ARGS="--device cuda --modes released,torch --rounds 1 --calls 2 --no-cold --worker-timeout 150
                --torch-variants eager,bf16,fp16,cudagraphs,fp16-cudagraphs,compile --budget $((LIMIT_TORCH - 25))"
    # the decoder alone: SAM's call, the eager BoxDecoder and the fused Triton decoder in each
    # precision, N = 1 to 3500 (SAM's call at 3500 runs out of memory and is reported)
    DECODER_FP16_ARGS="--config cellsam-vit-b --n 1,16,256,1024,3500 --formulations sam_repeat,shared,fused
                       --precisions bf16,fp16 --repeats 5"
    PROFILE_ARGS="--config cellsam-vit-b --n 256 --device cuda"
    DECODER_FP32_ARGS="--config cellsam-vit-b --n 1,16,256,1024,3500 --formulations sam_repeat,shared,fused
                       --precisions fp32 --repeats 5"
    # onnxruntime on the image is CPU-only (minutes per row at ViT-B size) and TensorRT is
    # absent: torch only here; a backend that is missing is listed in the report anyway
    BENCH_ARGS="--config cellsam-vit-b --n 1,10,100,1000,3500 --backends torch-fp32,torch-bf16,torch-fp16,torch-fp32-eager
                --cap baseline=1000 --repeats 3 --baseline-repeats 2"
    # the encoders end to end in each precision, SDPA against the Triton flash attention, at
    # 1000 user boxes and on CellFinder's path (a second report beside the bench's)
    ENCODERS_ARGS="--config cellsam-vit-b --n 1000 --backends torch-fp32,torch-fp32-flash,torch-bf16,torch-bf16-flash,torch-fp16,torch-fp16-flash
                   --cap baseline=0 --repeats 3 --baseline-repeats 1"
    # a 16-frame stack against 16 single calls, ViT-B steered to detect the synthetic cells
    STACK_ARGS="--device cuda --config cellsam-vit-b --backend torch --frames 16 --side 512 --batch-size 8"
    # 1000 user boxes on a 1024 x 1024 image, the call's stages (fused decoder: the default on CUDA)
    STAGES_ARGS="--config cellsam-vit-b --device cuda --size 1024 --user-boxes 1000"
    STAGES_VARIANTS=${STAGES_VARIANTS:-"fp32/sdpa fp32/flash bf16/sdpa bf16/flash"}
    # host preprocessing against its torch port on the GPU (and cuCIM's CLAHE where its wheel
    # travelled), three sizes, then the labels of whole ViT-B calls with each
    PREPROCESS_ARGS="--device cuda --sizes 512,1024,2048 --repeats 10 --labels --config cellsam-vit-b"
    # embed once, prompt many times: ViT-B steered on the released tissue crop (or a synthetic
    # image without .released/), 5 boxes per prompt, adds with up to 1000 cells on screen
    INTERACTIVE_ARGS="--device cuda --config cellsam-vit-b --on-screen 0,10,100,1000 --repeats 5
                      $( [ -d "${RELEASED:-.released}/sample_imgs" ] && echo --released "${RELEASED:-.released}" )"
fi

# the steps' limits that are the same on a CPU and on the GPU host
LIMIT_INTERACTIVE=${LIMIT_INTERACTIVE:-200} LIMIT_STAGES=${LIMIT_STAGES:-90} LIMIT_ENCODERS=${LIMIT_ENCODERS:-240}
LIMIT_PREPROCESS=${LIMIT_PREPROCESS:-150} LIMIT_STACK=${LIMIT_STACK:-150}
# a step that ignores the end of its time is killed this many seconds later
GRACE=15
for name in BUDGET LIMIT_TESTS LIMIT_SUITE LIMIT_DECODER LIMIT_TORCH LIMIT_BENCH LIMIT_INTERACTIVE LIMIT_STAGES \
            LIMIT_ENCODERS LIMIT_PREPROCESS LIMIT_STACK; do
    case ${!name} in
        *[!0-9]*) echo "gpu_session.sh: $name=${!name} is not a number of seconds" >&2; exit 2 ;;
    esac
done

# the most seconds a step can take: its limit and the grace, once per run it makes
limit_of() {
    local limit runs=1
    case $1 in
        tests) limit=$LIMIT_TESTS ;;
        torch) limit=$LIMIT_TORCH ;;
        profile) limit=$LIMIT_DECODER runs=2 ;;
        suite) limit=$LIMIT_SUITE ;;
        decoder) limit=$LIMIT_DECODER runs=2 ;;
        bench) limit=$LIMIT_BENCH ;;
        interactive) limit=$LIMIT_INTERACTIVE ;;
        stages) limit=$LIMIT_STAGES runs=$(set -- $STAGES_VARIANTS; echo $#) ;;
        encoders) limit=$LIMIT_ENCODERS ;;
        preprocess) limit=$LIMIT_PREPROCESS ;;
        stack) limit=$LIMIT_STACK ;;
        *) return 1 ;;
    esac
    echo $((runs * (limit + GRACE)))
}

# before any work: every step known, and on the GPU host the sum of their limits inside one
# device command (BUDGET seconds), so that no step is cut off by the command's own limit
planned=0 plan=""
for step in "$@"; do
    if ! seconds=$(limit_of "$step"); then
        echo "gpu_session.sh: unknown step '$step' (fetch-wheels | fetch-released | tests | torch | profile | suite | decoder | bench | encoders | interactive | stages | preprocess | stack)" >&2
        exit 2
    fi
    planned=$((planned + seconds)) plan="$plan $step=${seconds}s"
done
if [ -z "$SMOKE" ] && [ "$planned" -gt "${BUDGET:-590}" ]; then
    echo "gpu_session.sh: these steps may take up to ${planned} s ($plan , each run's limit and ${GRACE} s to stop)," \
         "over the ${BUDGET:-590}-second budget of one device command: run them in two commands, or lower their" \
         "limits (LIMIT_STAGES=60 ...) or raise BUDGET" >&2
    exit 2
fi

# the wheels are for the GPU host's Python; a smoke run here uses this machine's packages
if [ -z "$SMOKE" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
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

status=0
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# run_step NAME LIMIT LOG CMD...: run CMD under a time limit, output appended to LOG, and
# record how it ended. Exit 3 from the bench scripts means "rows failed and were reported".
run_step() {
    local name=$1 limit=$2 log=$3 rc
    shift 3
    timeout --signal=TERM --kill-after=$GRACE "$limit" "$@" 2>&1 | tee -a "$log"
    rc=$?
    case $rc in
        0) note "$name: ok" ;;
        3) note "$name: ran; some rows failed (listed below)" ;;
        124|137) note "$name: FAILED, stopped at its ${limit}-second limit"; status=1 ;;
        *) note "$name: FAILED (exit status $rc, see $(basename "$log"))"; status=1 ;;
    esac
}

for step in "$@"; do
    case $step in
        tests)  # every test marked gpu (parity, fp16 accuracy, CUDA graphs, fused attention), which skip on a CPU
            run_step tests "$LIMIT_TESTS" "$OUT/tests.log" $PY -m pytest -q -rs -p no:cacheprovider -m gpu ;;
        torch)  # the torch backend's switches side by side against the released loop (bench_default.py)
            if [ ! -f "$RELEASED/cellSAM/sam_inference.py" ]; then
                note "torch: FAILED, no released code in $RELEASED (bash bench/gpu_session.sh fetch-released)"; status=1
                continue
            fi
            run_step torch "$LIMIT_TORCH" "$OUT/torch.log" $PY bench/bench_default.py --released "$RELEASED" \
                $TORCH_ARGS --out "$OUT/torch-switches.json"
            [ -f "$OUT/torch-switches.md" ] && sed -n '/^| configuration/,$p' "$OUT/torch-switches.md" >> "$OUT/summary.txt" ;;
        profile)  # where one 256-box ViT-B decoder call spends its time, fp32 and fp16 (NOTES section 7)
            for precision in fp32 fp16; do
                flag=""; [ $precision = fp16 ] && flag="--fp16"
                [ -n "$SMOKE" ] && [ $precision = fp16 ] && continue  # autocast fp16 is CUDA only
                run_step "profile $precision" "$LIMIT_DECODER" "$OUT/profile.log" $PY bench/profile_decoder.py \
                    $PROFILE_ARGS $flag --out "$OUT/profile-$precision.md"
            done ;;
        suite)  # the whole test suite (on the GPU host: the CUDA tests run instead of skipping)
            run_step suite "$LIMIT_SUITE" "$OUT/suite.log" $PY -m pytest -q -rs ;;
        decoder)  # SAM's batched call, BoxDecoder eager and the fused Triton decoder: bf16/fp16 (CUDA only), then fp32
            for args in "$DECODER_FP16_ARGS" "$DECODER_FP32_ARGS"; do
                [ -n "$args" ] || continue
                run_step "decoder $args" "$LIMIT_DECODER" "$OUT/decoder.log" $PY bench/bench_decoder.py $args
            done
            # the JSON rows, without warnings and tracebacks
            grep '^{' "$OUT/decoder.log" > "$OUT/decoder.jsonl"
            $PY - "$OUT/decoder.jsonl" >> "$OUT/summary.txt" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    if "error" in row:
        print(f"  decoder row {row['formulation']} N={row['n']} {row.get('precision')}: {row['error']}")
    elif "tflops" in row:
        print(f"  fused {row['precision']} N={row['n']}: {row['ms_per_call']} ms, {row['ms_per_box']} ms/box, "
              f"{row['tflops']} TFLOP/s, {row['gb_per_s']} GB/s")
EOF
            ;;
        bench)
            run_step bench "$LIMIT_BENCH" "$OUT/bench.log" $PY bench/bench_latency.py $BENCH_ARGS --out-dir "$OUT/results"
            $PY - "$OUT/results" >> "$OUT/summary.txt" <<'EOF'
import json, pathlib, sys
reports = sorted(pathlib.Path(sys.argv[1]).glob("*/*.json"), key=lambda p: p.stat().st_mtime)
if not reports:
    print("  bench wrote no report")
    sys.exit()
report = json.loads(reports[-1].read_text())
print(f"  report {reports[-1].relative_to(sys.argv[1])}")
for kind, entry in report["backends"].items():
    if entry["status"] != "ok":
        print(f"  bench backend {kind} not measured: {entry['reason'][:300]}")
for row in report["skipped"]:
    if not row["reason"].startswith("capped at"):
        where = f" {row['boxes']} N={row.get('n')}" if "boxes" in row else ""
        print(f"  bench row {row['what']}{where}: {row['reason'][:300]}")
EOF
            ;;
        interactive)  # embed once, prompt many times: full call vs prompt on the kept embedding (bench_interactive.py)
            run_step interactive "$LIMIT_INTERACTIVE" "$OUT/interactive.log" $PY bench/bench_interactive.py \
                $INTERACTIVE_ARGS --out "$OUT/interactive.json"
            [ -f "$OUT/interactive.md" ] && sed -n '/^| call/,$p' "$OUT/interactive.md" >> "$OUT/summary.txt" ;;
        stages)  # one call accounted for: every stage of details.timings and what none measured (bench_stages.py)
            for variant in $STAGES_VARIANTS; do  # precision/attention
                precision=${variant%/*} attention=${variant#*/}
                run_step "stages $variant" "$LIMIT_STAGES" "$OUT/stages-$precision-$attention.log" \
                    $PY bench/bench_stages.py $STAGES_ARGS --precision "$precision" --attention "$attention" \
                    --out "$OUT/stages-$precision-$attention.json"
                sed -n '/^| stage/,$p' "$OUT/stages-$precision-$attention.log" >> "$OUT/summary.txt"
            done ;;
        encoders)  # 1000 boxes and CellFinder's path per precision, SDPA against flash attention (bench_latency.py)
            run_step encoders "$LIMIT_ENCODERS" "$OUT/encoders.log" $PY bench/bench_latency.py $ENCODERS_ARGS \
                --out-dir "$OUT/results-encoders" ;;
        preprocess)  # the host preprocessing against the device path: times, agreement, labels (bench_preprocess.py)
            run_step preprocess "$LIMIT_PREPROCESS" "$OUT/preprocess.log" $PY bench/bench_preprocess.py \
                $PREPROCESS_ARGS --out "$OUT/preprocess.json" ;;
        stack)  # frames per second: segment_stack against a loop of segment (bench_stack.py)
            run_step stack "$LIMIT_STACK" "$OUT/stack.log" $PY bench/bench_stack.py $STACK_ARGS --out "$OUT/stack.json" ;;
    esac
done
echo "--- summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit $status
