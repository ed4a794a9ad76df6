#!/usr/bin/env bash
# Train the shipped rdtf-tiny further on a GPU machine: its recipe plus appended refine phases, then its
# LoRA, packed for the trip back. The sampler sweeps and the quality bars need no GPU: run them after, at home.
#
#   tools/refine_on_gpu.sh OUT_DIR [rdtf build-tiny options]
#   tools/refine_on_gpu.sh "$OUT" --refine-steps 1000 600 --refine-learning-rate 3e-4 3e-4 --refine-batch-size 32 128
#
# It runs `rdtf build-tiny --from-model assets/rdtf-tiny --stop-after lora` in runs/rdtf-tiny-gpu. A GPU
# machine without the kit's full install works too:
#   - wheels in .whl/ (diffusers, say) are installed into /tmp/rdtf-site first;
#   - the prepared built-in data is taken from runs/rdtf-tiny/data when it is there (carry it: the fonts
#     that draw the set are not needed then, and the build checks it is the data the model trained on).
# Wheels for such a machine (fetched where PyPI is reachable; pick its Python version):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .whl \
#       diffusers==0.42.1 peft==0.21.2 importlib_metadata
# and the data without its encoder cache (<data>/.cache, about 200 MB, rebuilt there in minutes).
# Add --stop-after sweep to run the sampler sweeps there too.
# OUT_DIR gets rdtf-tiny.tar.gz in parts of at most 15 MB, plus build.log. At home:
#   cat OUT_DIR/rdtf-tiny.tar.gz.part-* | tar xz -C runs    # runs/shipped/rdtf-tiny and its -lora-spin
#   rm -r assets/rdtf-tiny assets/rdtf-tiny-lora-spin && mv runs/shipped/* assets/
#   rdtf build-tiny --from-model assets/rdtf-tiny --work-dir runs/rdtf-tiny-next [the same options]
# The last adopts both, trains nothing, and runs what the GPU machine did not (the sweeps); then `rdtf bars`.
set -euo pipefail

main() {
    local out=${1:?usage: tools/refine_on_gpu.sh OUT_DIR [rdtf build-tiny options]}
    shift
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    cd "$(dirname "$0")/.."
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rdtf-site .whl/*.whl
        export PYTHONPATH="/tmp/rdtf-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    local work=runs/rdtf-tiny-gpu
    if [ -d runs/rdtf-tiny/data ] && [ ! -e "$work/data" ]; then
        mkdir -p "$work"
        cp -r runs/rdtf-tiny/data "$work/data"
    fi
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$out/build.log"
    python3 -m rdtf build-tiny --from-model assets/rdtf-tiny --work-dir "$work" --out "$work/shipped/rdtf-tiny" \
        --stop-after lora --quiet "$@" 2>&1 | tee -a "$out/build.log"
    tar czf - -C "$work" shipped | split -b 15M -d - "$out/rdtf-tiny.tar.gz.part-"
    ls -l "$out" | tee -a "$out/build.log"
}

main "$@"  # parsed whole before it runs: editing this file meanwhile changes nothing
