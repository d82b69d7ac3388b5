#!/usr/bin/env bash
# The committed CPU reference (outputs/reference/cpu): every timing phase below is one sweep of
# experiment=reference_cpu (one timing setting for all, so the phases form one family and draw
# together), every memory phase one study, run in order of importance into OUTDIR with
# resume=true: an interrupted run carries on where it stopped, and cells already done on this
# machine and code are skipped.
#
#   OUTDIR=outputs/reference/cpu scripts/reference_cpu.sh        # `make paper` runs this
#
# Run it from a clean commit on a quiet machine (nothing else using the CPU): the records name
# the commit, and a dirty tree's records say -dirty. Takes about 2 hours on 2 cores.
#
# How the grid is trimmed to fit, and why (the README repeats this):
#   runtimes   both, ghost and Opacus: 6 models x B 16/64/256 x private/not (the runtime
#              figure and the cost-of-privacy table of experiment=ghost)
#   ghost      ghost_two_pass and opacus_ghost, private, B 64/256 (the rest of that table)
#   ablation   jit at B 16/64; vmap and none only at B 16 (an eager lstm step at B 256 takes
#              minutes; the ablation figure uses the batch size where all four engines ran)
#   frameworks jax_privacy, BackPACK, PyVacy, TF Privacy vectorised (with and without XLA):
#              private, B 64 and 256, five models; TF Privacy's per-example loops (tfp_loop,
#              tfp_loop_xla) on logreg, ffnn and cnn; the lstm at B 16 for jax_privacy, BackPACK
#              and TF Privacy (their lstm steps take 10-60 s at B 64-256). Their non-private
#              rows repeat plain PyTorch / non-private both, except Keras (tfp, tfp_xla), run once
#   cnn-pool   the max-pool comparison (experiment=cnn_pool)
#   devices    engine.devices=1,2,4 on forced CPU devices (into OUTDIR-4-devices), last timing
#   memory     experiment=memory (both vs vmap, 4 models) and experiment=ghost_memory for the
#              cells its targets compare (ghost and both private, both non-private) on the four
#              models whose tries take seconds (ffnn, cnn, embed, lstm); Opacus' maxima last
set -uo pipefail

OUTDIR=${OUTDIR:-outputs/reference/cpu}
PY=${PYTHON:-.venv/bin/python}
COMMON=(paths.output_dir="$OUTDIR" timing.progress=false hydra/job_logging=disabled resume=true)
RUN=("$PY" -m ablation.run -m experiment=reference_cpu "${COMMON[@]}")
MEM=("$PY" -m ablation.memory -m "${COMMON[@]}")
FRAMEWORKS=jax_privacy,backpack,pyvacy,tfp,tfp_xla
NOT_LSTM=logreg,ffnn,cnn,embed,cifar10
PROBED=ffnn,cnn,embed,lstm

phase() {
  echo "== $1 ($(date +%H:%M))"; shift
  "$@" || echo "   exit $? (see the records; resume=true reruns what is missing)"
}

phase runtimes "${RUN[@]}" engine=both,ghost,opacus
phase ghost "${RUN[@]}" engine=ghost_two_pass,opacus_ghost batch_size=64,256 private=true
phase jit "${RUN[@]}" engine=jit batch_size=16,64
phase ablation "${RUN[@]}" engine=vmap,none batch_size=16
phase frameworks "${RUN[@]}" engine=$FRAMEWORKS model=$NOT_LSTM batch_size=64 private=true
phase tf-loops "${RUN[@]}" engine=tfp_loop,tfp_loop_xla model=logreg,ffnn,cnn batch_size=64 private=true
phase frameworks-lstm "${RUN[@]}" engine=jax_privacy,backpack,tfp model=lstm batch_size=16 private=true
phase keras "${RUN[@]}" engine=tfp,tfp_xla model=$NOT_LSTM batch_size=64 private=false
phase frameworks-256 "${RUN[@]}" engine=$FRAMEWORKS model=$NOT_LSTM batch_size=256 private=true
phase cnn-pool "$PY" -m ablation.run -m experiment=cnn_pool "${COMMON[@]}"
# The data-parallel step on four forced CPU devices (they share the two cores: correctness and
# overhead, not speed-up); XLA_FLAGS is part of the machine's identity, so its own folder.
phase devices env XLA_FLAGS=--xla_force_host_platform_device_count=4 "$PY" -m ablation.run -m \
  experiment=reference_cpu engine=both,ghost engine.devices=1,2,4 model=ffnn,cnn batch_size=256 \
  private=true "${COMMON[@]}" paths.output_dir="$OUTDIR-4-devices"
phase memory "${MEM[@]}" experiment=memory
phase ghost-memory "${MEM[@]}" experiment=ghost_memory engine=both,ghost model=$PROBED private=true
phase ghost-memory-np "${MEM[@]}" experiment=ghost_memory engine=both model=$PROBED private=false
phase ghost-memory-opacus "${MEM[@]}" experiment=ghost_memory engine=opacus model=$PROBED private=true
echo "== done ($(date +%H:%M)): $(find "$OUTDIR" -name result.json | wc -l) records"
