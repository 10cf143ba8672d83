#!/usr/bin/env bash
# The README's "model as classifier and as editor" numbers (CPU; resumable: a finished folder is skipped).
#   scripts/editor_table.sh [OUT=outputs/editor_table]
# 1. the Diffusion Classifier on the first 300 test images (adaptive: 20 pairs for all classes, 100 for the best 3);
# 2. reconstruction after DDIM inversion at w = 1, 2, 3, CFG++ inversion at the lambdas whose median effective CFG
#    weight is 1, 2, 3 over this 50-step grid (scripts/cfgpp_effective_scale.py --steps 50 --match 1,2,3: 0.126,
#    0.252, 0.379) and null-text inversion at w = 2, 3 (at w = 1 it is DDIM inversion: the null embedding is unused),
#    on the first 32 test images (null-text: the first 16);
# 3. the edit shirt (6) -> coat (4) on the first 16 shirts of the test split, from each inversion at w = 3 / lambda 0.379.
set -euo pipefail
OUT=${1:-outputs/editor_table}
PY=${PYTHON:-python}
done_or() { [ -f "$1/$2" ] || { echo "+ $*" >&2; "${@:3}"; }; }
done_or "$OUT/classify_n300" classify.json $PY -m diffguide.classify num_images=300 n_samples=[20,100] to_keep=[3,1] \
    out_dir="$OUT/classify_n300"
I32=$($PY -c "print(list(range(32)))" | tr -d ' ')
I16=$($PY -c "print(list(range(16)))" | tr -d ' ')
for w in 1 2 3; do
    done_or "$OUT/ddim_w$w" edit.json $PY -m diffguide.edit inversion=ddim scale=$w images=$I32 out_dir="$OUT/ddim_w$w"
done
for lam in 0.126 0.252 0.379; do
    done_or "$OUT/cfgpp_l$lam" edit.json $PY -m diffguide.edit inversion=cfgpp scale=$lam images=$I32 \
        out_dir="$OUT/cfgpp_l$lam"
done
for w in 2 3; do
    done_or "$OUT/ddim16_w$w" edit.json $PY -m diffguide.edit inversion=ddim scale=$w images=$I16 out_dir="$OUT/ddim16_w$w"
    done_or "$OUT/null_text_w$w" edit.json $PY -m diffguide.edit inversion=null_text scale=$w images=$I16 \
        out_dir="$OUT/null_text_w$w"
done
S=$($PY -c "from diffguide.data import fashion_mnist as f; _, y = f.load('test'); print([i for i in range(len(y)) if y[i] == 6][:16])" | tr -d ' ')
done_or "$OUT/edit_ddim" edit.json $PY -m diffguide.edit inversion=ddim scale=3 images=$S edit.target=4 out_dir="$OUT/edit_ddim"
done_or "$OUT/edit_cfgpp" edit.json $PY -m diffguide.edit inversion=cfgpp scale=0.379 images=$S edit.target=4 \
    out_dir="$OUT/edit_cfgpp"
done_or "$OUT/edit_null_text" edit.json $PY -m diffguide.edit inversion=null_text scale=3 images=$S edit.target=4 \
    out_dir="$OUT/edit_null_text"
