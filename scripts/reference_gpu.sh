#!/usr/bin/env bash
# The GPU reference run, trimmed to fit a few minutes of a lent GPU: the ablation at batch 128
# (private), Opacus beside it, `both` at batch 16/256/1024 private and not, the eager `none`
# engine, and a with-vs-without-XLA memory probe. Phases run in that order (most wanted first)
# under one deadline (BUDGET_S seconds): a phase that would start past it is skipped, one that
# runs into it is stopped (its finished cells are kept), and after each phase the records are
# packed into $OUT/records.tgz when $OUT is set. Cells already done in OUTDIR are skipped
# (resume=true), so a second lease carries on where the first stopped.
#
#   BUDGET_S=480 OUTDIR=outputs/reference/h100 scripts/reference_gpu.sh
#
# What a cell costs on one H100 (jax 0.11.2): 6-23 s for the jit engines and Opacus (a fresh
# process, CUDA start-up and the compile dominate), 12-50 s for `vmap` (each primitive's kernel
# is compiled on first use, eagerly), 30-65 s for `none` at a few eager steps of 3-8 s. All of
# it takes about 20 minutes; 8 minutes covered the first phase and a part of the next.
# The LSTM runs with lax.scan (model.unroll=dynamic) everywhere: compiling the paper's 256-step
# static unroll takes minutes per cell. `none` skips the LSTM and cifar10 (minutes per step).
set -uo pipefail

OUTDIR=${OUTDIR:-outputs/reference/gpu}
PY=${PYTHON:-python3}
LOG=${LOG:-${OUT:-/tmp}/reference_gpu.log}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-480} ))
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
COMMON=(paths.output_dir="$OUTDIR" timing.progress=false hydra/job_logging=disabled
        ++model.unroll=dynamic resume=true)

pack() {
  [[ -n "${OUT:-}" && -d "$OUTDIR" ]] || return 0
  tar czf "$OUT/records.tgz" --exclude=.hydra --exclude='*.spec.json' --exclude='*.out.json' \
      "$OUTDIR"
}

# phase NAME CMD...: run CMD until the deadline; print one line per finished cell.
phase() {
  local name=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 15 )); then echo "== $name: skipped (deadline)"; return 0; fi
  echo "== $name (${left} s left)"
  timeout -k 10 "$left" "$@" >>"$LOG" 2>&1
  local rc=$?
  (( rc == 124 )) && echo "   stopped at the deadline"
  (( rc != 0 && rc != 124 )) && echo "   exit $rc (see the log)"
  pack
}

: >"$LOG"
"$PY" - <<'EOF' || exit 1
import jax, jaxlib, haiku, optax, hydra, dp_accounting
print("jax", jax.__version__, "|", jax.devices())
EOF
# One short cell first: if the toolkit cannot run here, stop before spending the budget.
"$PY" -m ablation.run paths.output_dir="${TMPDIR:-/tmp}/reference_gpu_smoke" \
    hydra/job_logging=disabled timing.progress=false timing.max_steps=3 timing.budget_s=1 \
    >>"$LOG" 2>&1
grep -q '^\[ok\] both ffnn' "$LOG" || { echo "smoke cell failed:"; tail -40 "$LOG"; exit 1; }

ABLATION=(-m ablation.run -m experiment=ablation "${COMMON[@]}" timing.budget_s=2 timing.timeout_s=90)
phase ablation "$PY" "${ABLATION[@]}" engine=both,jit,vmap \
    model=logreg,ffnn,cnn,embed,lstm,cifar10
phase opacus "$PY" "${ABLATION[@]}" engine=opacus model=logreg,ffnn,cnn,embed,lstm,cifar10
phase runtimes "$PY" -m ablation.run -m experiment=reference_gpu "${COMMON[@]}" \
    batch_size=16,256,1024 timing.budget_s=1 timing.max_steps=50 timing.timeout_s=90
phase ablation-none "$PY" "${ABLATION[@]}" engine=none model=logreg,ffnn,cnn,embed
phase memory "$PY" -m ablation.memory -m "${COMMON[@]}" engine=both,vmap model=cnn \
    memory.limit_gb=1 memory.start=64 memory.resolution=0.25 memory.timeout_s=60

grep -hE '^\[(ok|error|oom|timeout)' "$LOG" | sed 's/^/   /'
echo "records: $(find "$OUTDIR" -name result.json | wc -l)"
