#!/usr/bin/env bash
# Reruns the experiments of docs/experiments.md, each a resumable `loratune sweep` (run the same command again to
# continue after a stop), three seeds each, and copies each sweep's results.csv under docs/experiments/.
#
#   scripts/experiments.sh encoder            # the encoder table, a rate per method: ~11 minutes on a 2-core CPU
#   scripts/experiments.sh table5 table6 full # the demo-task tables, on a 2-core CPU: ~35, ~70 and ~50 minutes
#   scripts/experiments.sh subspace           # §7.2/§7.3 from table6's adapters: ~2 minutes
#   scripts/experiments.sh strength           # table5's W_q adapters (3 seeds) at strengths 0..2: ~30 minutes
#   scripts/experiments.sh resize             # the README's resize table and spectra, 3 seeds: ~28 minutes
#   scripts/experiments.sh adaptersize        # adapter sizes against 7B-shaped bases (configs only): ~2 minutes
#   scripts/experiments.sh optimizer          # a full fine-tune's optimizer states, AdamW against 8-bit: ~5 minutes
#   scripts/experiments.sh numbers mix        # two task adapters mixed (after full): ~19 minutes
#   scripts/experiments.sh pairs              # the sentence-pair task's full and LoRA references: ~8 minutes
#   scripts/experiments.sh pairsmethods       # the encoder table's four methods on the sentence-pair task: ~23 min
#   scripts/experiments.sh d90pairs           # d90 on the sentence-pair task (after pairs): ~1 hour
#   scripts/experiments.sh d90demo            # d90 on the demo task (after full): ~2 hours
#   scripts/experiments.sh d90flat            # the demo's d90 curve at large d, finer rates: ~48 min
#   scripts/experiments.sh all
#   scripts/experiments.sh keep table5        # keep the finished runs' records of a sweep stopped half-way
#
# OUT (default runs/experiments) holds the run directories (full fine-tunes write whole models: gigabytes).
# docs/experiments/NAME/runs/ keeps each finished run's record (config, summary, logged steps): the raw data of
# the tables, and where a sweep continues from on another machine (scripts/experiment_records.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/experiments}
LORATUNE=${LORATUNE:-loratune}
PYTHON=${PYTHON:-python}
DEMO=examples/demo/config.yaml
CLASSIFY=examples/classify/config.yaml

sweep() {  # sweep NAME CONFIG ARGS...: run it (after the runs kept before), then keep its records and results.csv
    local name=$1 config=$2
    shift 2
    local started=$SECONDS
    "$PYTHON" scripts/experiment_records.py restore "docs/experiments/$name/runs" "$OUT/$name"
    "$LORATUNE" sweep "$config" --seeds "${SEEDS:-3}" --out "$OUT/$name" "$@"
    keep "$name"
    cp "$OUT/$name/results.csv" "docs/experiments/$name.csv"
    echo "$name: $((SECONDS - started)) s"
}

keep() {  # keep NAME: the records of the sweep's finished runs under docs/experiments/NAME/runs
    "$PYTHON" scripts/experiment_records.py keep "$OUT/$1" "docs/experiments/$1/runs"
}

table5() {  # which matrices at a fixed budget (the LoRA paper's Table 5)
    sweep demo/table5 "$DEMO" \
        --grid 'lora.target_modules=[q_proj],[k_proj],[v_proj],[o_proj],[q_proj,k_proj],[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]' \
        --budget 276480 --set train.exact_match=true --set data.retain=builtin
}

table6() {  # how small a rank (Table 6)
    sweep demo/table6 "$DEMO" --grid lora.r=1,2,4,8,64 \
        --grid 'lora.target_modules=[q_proj],[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]' \
        --set train.exact_match=true --set data.retain=builtin
}

subspace() {  # the paper's §7.2 / §7.3 on Table 6's W_q + W_v adapters (after table6): subspace.csv and its plot
    "$PYTHON" scripts/subspace_study.py --sweep "$OUT/demo/table6" --work "$OUT/demo/subspace" \
        --loratune "$(command -v "$LORATUNE")"
}
strength() {  # an adapter's strength as a dial: Table 5's W_q row, each seed's adapter at strengths 0 to 2 (after table5)
    "$PYTHON" scripts/strength_curve.py "$OUT"/demo/table5/target_modules=q_proj,seed={0,1,2}/adapter \
        --data examples/demo/eval.jsonl --max-examples 100 --csv docs/experiments/strength.csv \
        --plot docs/images/strength.png
}

resize() {  # the README's "Choosing a rank": r = 64 cut down by `resize` against r = 8 trained, and their spectra
    sweep demo/resize-r64 "$DEMO" --set lora.r=64 --set lora.lora_alpha=128
    sweep demo/resize-r8 "$DEMO"
    "$PYTHON" scripts/resize_study.py --r64 "$OUT"/demo/resize-r64/seed={0,1,2}/adapter \
        --r8 "$OUT"/demo/resize-r8/seed={0,1,2}/adapter --work "$OUT/demo/resize" --data examples/demo/eval.jsonl \
        --csv docs/experiments/demo/resize.csv --ranks-csv docs/experiments/demo/resize_ranks.csv \
        --phi-csv docs/experiments/demo/resize_phi.csv
}

adaptersize() {  # an adapter's file against its base at 7B scale, from the architectures' configs (no weights)
    "$PYTHON" scripts/adapter_size.py --csv docs/experiments/adapter_size.csv
}

optimizer() {  # QLoRA's third ingredient: AdamW's states in 8 bits (bitsandbytes), on a full fine-tune of the demo's base
    # (paged_adamw_8bit pages them to the CPU on CUDA only). Memory is the measure; one seed (it does not vary).
    SEEDS=1 sweep demo/optimizer "$DEMO" --grid train.optimizer=adamw,adamw_8bit --set train.method=full \
        --set train.lr=1e-4 --set model.dtype=fp32 --set train.max_steps=3 --set train.batch_size=4 \
        --set train.save_every=3
    local run states
    echo "run,optimizer_states_bytes" > docs/experiments/demo/optimizer_states.csv
    for run in "$OUT"/demo/optimizer/*/; do
        states=$(stat -c %s "$run"checkpoints/*/optimizer.safetensors)
        echo "$(basename "$run"),$states" >> docs/experiments/demo/optimizer_states.csv
    done
}

full() {  # LoRA against full fine-tuning on the demo task
    sweep demo/full "$DEMO" --grid train.method=full --grid train.lr=2e-5,1e-4,3e-4,1e-3 \
        --set train.exact_match=true --set data.retain=builtin
    # LoRA at the demo's learning rate, below it and above it: its best rate, and how much of its forgetting is the rate
    sweep demo/lora "$DEMO" --grid train.lr=5e-4,1e-3,2e-3,5e-3 --set train.exact_match=true --set data.retain=builtin
}

numbers() {  # a second task on the demo's base (numbers in words to digits), for the mix study
    sweep mix/numbers examples/numbers/config.yaml --set data.retain=builtin
}

mix() {  # the demo's date adapters and the numbers adapters, alone and mixed, on both tasks (after full, numbers)
    "$PYTHON" scripts/mix_study.py --dates "$OUT/demo/lora" --numbers "$OUT/mix/numbers" --work "$OUT/mix/mixed" \
        --loratune "$(command -v "$LORATUNE")"
}

# each method's learning-rate grid for the encoder tables (seed 0), the best rate then taking seeds 1 and 2; on the
# sentence-pair task LoRA's best was the classification grid's lowest rate and the head's its highest: both extended
ENCODER_RATES=(full:3e-5,1e-4,3e-4,1e-3 bitfit:1.5e-3,5e-3,1.5e-2,5e-2 lora:1e-3,3e-3,1e-2,3e-2
    head:5e-3,1.5e-2,5e-2,1.5e-1)
PAIRS_RATES=(full:3e-5,1e-4,3e-4,1e-3 bitfit:1.5e-3,5e-3,1.5e-2,5e-2 lora:3e-4,1e-3,3e-3,1e-2,3e-2
    head:5e-3,1.5e-2,5e-2,1.5e-1,5e-1,1.5)
encoder_methods() {  # encoder_methods CONFIG NAME METHOD:RATES...: LoRA, full, BitFit, the head alone (Table 2)
    local config=$1 name=$2 entry method_name lr method
    shift 2
    for entry in "$@"; do
        method_name=${entry%%:*}
        case $method_name in
            full) method=(--set train.method=full) ;;
            bitfit) method=(--set train.method=bitfit) ;;
            lora) method=() ;;
            head) method=(--set train.method=full --set 'train.full_modules=[classifier]') ;;
        esac
        SEEDS=1 sweep "$name/$method_name-lr" "$config" "${method[@]}" --set train.save_every=1000 \
            --grid "train.lr=${entry#*:}"
        lr=$("$PYTHON" scripts/encoder_study.py choose "docs/experiments/$name/$method_name-lr/runs")
        SEEDS=1 sweep "$name/$method_name/lr=$lr" "$config" "${method[@]}" --set train.save_every=1000 \
            --set "train.lr=$lr" --grid train.seed=1,2
    done
    "$PYTHON" scripts/encoder_study.py report "docs/experiments/$name" --csv "docs/experiments/$name.csv"
}
encoder() { encoder_methods "$CLASSIFY" encoder "${ENCODER_RATES[@]}"; }  # on the classification demo

PAIRS=examples/pairs/config.yaml
pairs() {  # the sentence-pair task's references (full fine-tuning, LoRA) for d90 on a classifier
    sweep pairs/full "$PAIRS" --set train.method=full --set train.lr=1e-4 --set train.save_every=1000
    sweep pairs/lora "$PAIRS" --set train.save_every=1000
}
pairsmethods() { encoder_methods "$PAIRS" pairs/methods "${PAIRS_RATES[@]}"; }  # the same four methods on the sentence-pair task

D90_DIMS=120,150,200,300,500,1000
d90pairs() {  # d90 by the paper's definition on the sentence-pair task: a learning rate per d, then three seeds
    local intrinsic=(--set train.method=intrinsic --set train.save_every=1000)
    SEEDS=1 sweep pairs/d90-lr "$PAIRS" "${intrinsic[@]}" --grid intrinsic.dim=$D90_DIMS --grid train.lr=0.1,0.3,1
    "$PYTHON" scripts/d90_study.py choose docs/experiments/pairs/d90-lr/runs | while read -r dim lr; do
        SEEDS=1 sweep "pairs/d90/dim=$dim" "$PAIRS" "${intrinsic[@]}" --set "intrinsic.dim=$dim" --set "train.lr=$lr" \
            --grid train.seed=1,2
    done
    "$PYTHON" scripts/d90_study.py report docs/experiments/pairs
}

D90_DEMO_DIMS=1000,2000,3000,5000,10000,30000,100000
d90demo() {  # the same on the demo task, every one of smollm2-135m's weights projected (after full: the reference)
    local intrinsic=(--set train.method=intrinsic --set train.exact_match=true)
    SEEDS=1 sweep demo/d90-lr "$DEMO" "${intrinsic[@]}" --grid intrinsic.dim=$D90_DEMO_DIMS --grid train.lr=0.1,0.3,1
    "$PYTHON" scripts/d90_study.py choose docs/experiments/demo/d90-lr/runs | while read -r dim lr; do
        SEEDS=1 sweep "demo/d90/dim=$dim" "$DEMO" "${intrinsic[@]}" --set "intrinsic.dim=$dim" --set "train.lr=$lr" \
            --grid train.seed=1,2
    done
    "$PYTHON" scripts/d90_study.py report docs/experiments/demo --reference-lr 3e-4 --lora-lr 2e-3 \
        --csv docs/experiments/demo/d90.csv --plot docs/images/d90_demo.png \
        --title "d90 on the demo task (smollm2-135m, 134.5M parameters projected)"
}

d90flat() {  # where the demo's d90 curve stops rising (seed 0): d = 100,000 at rates below and between d90demo's
    # grid (its 0.1 was the only rate that did not diverge), seeds 1 and 2 at the best; d = 300,000 at two rates
    local intrinsic=(--set train.method=intrinsic --set train.exact_match=true)
    SEEDS=1 sweep demo/d90-flat "$DEMO" "${intrinsic[@]}" --set intrinsic.dim=100000 --grid train.lr=0.03,0.05,0.2
    "$PYTHON" scripts/d90_study.py choose docs/experiments/demo/d90-flat/runs | while read -r dim lr; do
        SEEDS=1 sweep "demo/d90-flat-seeds/dim=$dim" "$DEMO" "${intrinsic[@]}" --set "intrinsic.dim=$dim" \
            --set "train.lr=$lr" --grid train.seed=1,2
    done
    SEEDS=1 sweep demo/d90-flat-300k "$DEMO" "${intrinsic[@]}" --set intrinsic.dim=300000 --grid train.lr=0.03,0.05
}

sections=("$@")
[[ ${#sections[@]} -eq 0 ]] && { sed -n '2,18p' "$0"; exit 2; }
[[ ${sections[0]} == all ]] && sections=(encoder table5 table6 subspace strength resize adaptersize optimizer full numbers mix pairs pairsmethods d90pairs d90demo d90flat)
if [[ ${sections[0]} == keep ]]; then  # keep SECTION...: each section's sweeps, as far as they got
    for section in "${sections[@]:1}"; do
        case $section in
            table5 | table6) keep "demo/$section" ;;
            full) keep demo/full && keep demo/lora ;;
            optimizer) keep demo/optimizer ;;
            d90flat)
                keep demo/d90-flat && keep demo/d90-flat-300k
                for run in "$OUT"/demo/d90-flat-seeds/*/; do [[ -d $run ]] && keep "demo/d90-flat-seeds/$(basename "$run")"; done ;;
            numbers) keep mix/numbers ;;
            pairs) keep pairs/full && keep pairs/lora ;;
            d90pairs | d90demo)
                task=$([[ $section == d90pairs ]] && echo pairs || echo demo)
                keep "$task/d90-lr"
                for run in "$OUT/$task"/d90/*/; do [[ -d $run ]] && keep "$task/d90/$(basename "$run")"; done ;;
            resize) keep demo/resize-r64 && keep demo/resize-r8 ;;
            encoder | pairsmethods)
                prefix=$([[ $section == encoder ]] && echo encoder || echo pairs/methods)
                for name in full bitfit lora head; do
                    keep "$prefix/$name-lr"
                    for run in "$OUT/$prefix/$name"/lr=*/; do [[ -d $run ]] && keep "$prefix/$name/$(basename "$run")"; done
                done ;;
            *) echo "scripts/experiments.sh: no section '$section'" >&2; exit 2 ;;
        esac
    done
    exit 0
fi
for section in "${sections[@]}"; do
    case $section in
        table5 | table6 | subspace | strength | resize | adaptersize | optimizer | full | numbers | mix | encoder | pairs | pairsmethods | d90pairs | d90demo | d90flat) "$section" ;;
        *) echo "scripts/experiments.sh: no section '$section' (sections: table5 table6 subspace strength resize adaptersize optimizer full numbers mix encoder pairs pairsmethods d90pairs d90demo d90flat all)" >&2; exit 2 ;;
    esac
done
