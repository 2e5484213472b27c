#!/usr/bin/env bash
# Build and score a shipping rule's two candidates (weights/MODEL_CARD.md) at iteration N of a
# training run, and the shipped weights as the baseline, then apply the rule.
#
#   bash release/candidates.sh RULE RUN N OUT [baseline|A|B|rule ...]
#
# RULE: loc (R-loc, a localization run) or pseudo (R-pseudo, an SCN run with pseudo-labels).
# RUN: the training run folder (its snapshots/ every 500 iterations or finer). A is the EMA
# snapshot at N, B the mean of three snapshots: for R-loc at N - 2,000, N - 1,000 and N, for
# R-pseudo at N - 1,000, N - 500 and N; GAP=K in the environment sets the spacing to K for a rule
# written with a shorter run (R-wide: N - 400, N - 200, N). OUT receives the
# candidate folders (OUT/candA, OUT/candB) and the score files. Without a step list every step
# runs; a step whose files exist is not redone, so an interrupted scoring resumes. The rule step
# keeps the verdict as OUT/rule.txt and, as data for the record, OUT/rule.json.
set -euo pipefail

rule=$1 run=$2 n=$3 out=$4
shift 4
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(baseline A B rule)
python=${PYTHON:-.venv/bin/python}
anatomy=${ANATOMY:-../shared/anatomy}
unlabelled=${UNLABELLED:-../shared/data/unlabelled/images}
case $rule in
    loc) network=localization module=release.localization_rule second=cov gap=1000 ;;
    pseudo) network=segmentation module=release.pseudo_rule second=pseudo gap=500 ;;
    *) echo "unknown rule: $rule (loc or pseudo)" >&2; exit 2 ;;
esac
gap=${GAP:-$gap}
if ! [[ $gap =~ ^[1-9][0-9]*$ ]]; then
    echo "GAP must be a positive whole number of iterations, not '$gap'" >&2; exit 2
fi

snapshot() { printf '%s/snapshots/%06d' "$run" "$1"; }

finish() {  # finish FILE: the command wrote FILE.part; only a complete file gets the name
    mv "$1.part" "$1"
}

score() {  # score NAME WEIGHTS_DIR
    local name=$1 weights=$2
    if [ ! -s "$out/${second}_$name.json" ]; then
        if [ "$second" = cov ]; then
            "$python" -m release.roi_coverage --weights "$weights" --seeds --anatomy "$anatomy" \
                --in-plane-size 512 --json "$out/cov_$name.json.part"
            finish "$out/cov_$name.json"
        else
            rm -rf "$out/pseudo_$name"
            "$python" -m training.pseudo_label "$unlabelled" --weights "$weights" \
                --out "$out/pseudo_$name"
            cp "$out/pseudo_$name/pseudo_labels.json" "$out/pseudo_$name.json.part"
            finish "$out/pseudo_$name.json"
        fi
    fi
    if [ ! -s "$out/scores_$name.json" ]; then
        "$python" -m release.score_weights --weights "$weights" --anatomy "$anatomy" \
            --json "$out/scores_$name.json.part"
        finish "$out/scores_$name.json"
    fi
}

mkdir -p "$out"
for step in "${steps[@]}"; do
    case $step in
        baseline) score baseline weights ;;
        A)
            [ -d "$out/candA" ] || cp -r "$(snapshot "$n")" "$out/candA"
            score A "$out/candA" ;;
        B)
            if [ ! -d "$out/candB" ]; then
                averaged=("$(snapshot $((n - 2 * gap)))" "$(snapshot $((n - gap)))" "$(snapshot "$n")")
                for folder in "${averaged[@]}"; do
                    [ -d "$folder" ] || { echo "no snapshot $folder for candidate B" >&2; exit 2; }
                done
                "$python" -m training.average_weights --network "$network" --out "$out/candB" \
                    "${averaged[@]}"
            fi
            score B "$out/candB" ;;
        rule)
            args=(--baseline "$out/scores_baseline.json" "$out/${second}_baseline.json")
            for c in A B; do
                if [ -s "$out/scores_$c.json" ] && [ -s "$out/${second}_$c.json" ]; then
                    args+=(--candidate "$c" "$out/scores_$c.json" "$out/${second}_$c.json")
                fi
            done
            "$python" -m "$module" "${args[@]}" --json "$out/rule.json" | tee "$out/rule.txt" ;;
        *) echo "unknown step: $step (baseline, A, B or rule)" >&2; exit 2 ;;
    esac
done
