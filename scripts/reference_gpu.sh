#!/usr/bin/env bash
# The GPU reference: what outputs/reference/<gpu>/ holds, in phases under one deadline, so a
# short lease of a GPU produces as much of it as fits and a later lease finishes it (every
# phase runs with resume=true: cells already done in OUTDIR on this machine and code are skipped).
#
#   BUDGET_S=780 OUTDIR=outputs/reference/h200 scripts/reference_gpu.sh
#
# Phases, most wanted first (each is a named experiment; its YAML says what it sweeps):
#   runtimes   experiment=reference_gpu   both, 6 models x B 16-1024 x private/not (84 cells)
#   ablation   experiment=ablation        the four engines at B 128, private (none: small models)
#   opacus     experiment=ablation        Opacus (hooks) beside them, B 128, private/not
#   memory     experiment=memory_gpu      largest batch with and without XLA under an 8 GiB cap
# A phase that would start past the deadline is skipped, one that runs into it is stopped (its
# finished cells are kept), and after each phase the records are packed into $OUT/records.tgz
# when $OUT is set. The records name their machine, versions and commit: run it from a clean
# commit (git status shows nothing), or the records say -dirty and resume never mixes them.
#
# What a cell costs on one H100 (jax 0.11.2): 6-23 s for the jit engines and Opacus (a fresh
# process, CUDA start-up and the compile dominate), 12-50 s for `vmap`, 30-65 s for `none`.
# All phases take about 40 minutes; 13 minutes cover the runtime grid and most of the ablation.
set -uo pipefail

OUTDIR=${OUTDIR:-outputs/reference/gpu}
PY=${PYTHON:-python3}
LOG=${LOG:-${OUT:-/tmp}/reference_gpu.log}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-780} ))
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
COMMON=(paths.output_dir="$OUTDIR" timing.progress=false hydra/job_logging=disabled resume=true)

source "$(dirname "$0")/phases.sh"

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

phase runtimes "$PY" -m ablation.run -m experiment=reference_gpu "${COMMON[@]}"
phase ablation "$PY" -m ablation.run -m experiment=ablation "${COMMON[@]}" engine=both,jit,vmap
phase ablation-none "$PY" -m ablation.run -m experiment=ablation "${COMMON[@]}" engine=none \
    model=logreg,ffnn,cnn,embed
phase opacus "$PY" -m ablation.run -m experiment=ablation "${COMMON[@]}" engine=opacus \
    private=true,false
phase memory "$PY" -m ablation.memory -m experiment=memory_gpu "${COMMON[@]}"

grep -hE '^\[(ok|error|oom|timeout)' "$LOG" | sed 's/^/   /'
echo "records: $(find "$OUTDIR" -name result.json | wc -l)"
