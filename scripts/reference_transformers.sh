#!/usr/bin/env bash
# The committed transformer and ViT reference (outputs/reference/cpu-transformers): every timing
# phase is one sweep of experiment=transformers (one timing setting for all, so the phases form
# one family and draw together), run in order of importance into OUTDIR with resume=true.
#
#   OUTDIR=outputs/reference/cpu-transformers scripts/reference_transformers.sh
#
# Run it from a clean commit on a quiet machine. Takes about 75 minutes on 2 cores.
#   runtimes   both, ghost and Opacus (hooks; private=false is plain PyTorch), B 16/64/256,
#              private and not: the cost table's anchors
#   frameworks Opacus' ghost clipping and functorch modes, jax_privacy, TF Privacy (private),
#              B 64/256 (where the targets are); Keras without privacy
#   ablation   jit, vmap, none, PyVacy and BackPACK at B 16, private (loops over examples and
#              eager op dispatch take seconds to minutes a step at larger batches)
#   memory     experiment=transformers_memory for ghost and both (private), and both without
#              privacy: the largest batch under 0.5 GiB
set -uo pipefail

OUTDIR=${OUTDIR:-outputs/reference/cpu-transformers}
PY=${PYTHON:-.venv/bin/python}
COMMON=(paths.output_dir="$OUTDIR" timing.progress=false hydra/job_logging=disabled resume=true)
RUN=("$PY" -m ablation.run -m experiment=transformers "${COMMON[@]}")

phase() {
  echo "== $1 ($(date +%H:%M))"; shift
  "$@" || echo "   exit $? (see the records; resume=true reruns what is missing)"
}

phase runtimes "${RUN[@]}" engine=both,ghost,opacus
phase frameworks "${RUN[@]}" engine=opacus_ghost,opacus_functorch,jax_privacy,tfp \
  batch_size=64,256 private=true
phase keras "${RUN[@]}" engine=tfp batch_size=64,256 private=false
phase ablation "${RUN[@]}" engine=jit,vmap,none,pyvacy,backpack batch_size=16 private=true
MEM=("$PY" -m ablation.memory -m experiment=transformers_memory "${COMMON[@]}")
phase memory "${MEM[@]}" engine=both,ghost private=true
phase memory-np "${MEM[@]}" engine=both private=false
echo "== done ($(date +%H:%M)): $(find "$OUTDIR" -name result.json | wc -l) records"
