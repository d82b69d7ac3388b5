#!/usr/bin/env bash
# One private run over several processes on a GPU node: one process per GPU, NCCL between
# them (jax.distributed), beside scripts/reference_gpu.sh. Phases under one deadline, most
# wanted first; records go to $OUTDIR, packed into $OUT/records.tgz after each phase when $OUT
# is set. Run it from a clean commit (the records name it).
#
#   BUDGET_S=600 OUTDIR=outputs/reference/h100-processes scripts/reference_gpu_distributed.sh
#
#   exact      tests/distributed_case.py as 1 and 2 processes (one GPU each): the clipped sum
#              and the released update of both / ghost / ghost two-pass, 2 ÷ 1, and the
#              parameters' hash on each process after 10 steps (needs 2 GPUs)
#   gpus       experiment=scaling over 1, 2, 4, 8 processes, as many as the node has GPUs,
#              batch 1024 (strong: the global batch; weak: per process)
#   cpu        experiment=scaling on the node's CPU cores (JAX_PLATFORMS=cpu, gloo): the
#              2-core CI machine's table, on a machine with cores to share
# On a node with one GPU the first two phases say so and the CPU phase still runs.
set -uo pipefail

OUTDIR=${OUTDIR:-outputs/reference/gpu-processes}
PY=${PYTHON:-python3}
LOG=${LOG:-${OUT:-/tmp}/reference_gpu_distributed.log}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-600} ))
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
COMMON=(paths.output_dir="$OUTDIR" timing.progress=false hydra/job_logging=disabled resume=true)
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
echo "GPUs on this node: ${GPUS:-0}"

MIN_LEFT_S=30
source "$(dirname "$0")/phases.sh"

: >"$LOG"
"$PY" - <<'PYEOF' || exit 1
import jax, haiku, optax, hydra, dp_accounting
print("jax", jax.__version__, "|", jax.devices())
PYEOF

exact() {  # one and two processes, one GPU each, on the same global batch and key
  local dir=${TMPDIR:-/tmp}/distributed_case port=$(( 20000 + RANDOM % 20000 ))
  mkdir -p "$dir"
  CUDA_VISIBLE_DEVICES=0 "$PY" tests/distributed_case.py 0 1 0 "$dir/1-0.npz" || return 1
  for rank in 0 1; do
    CUDA_VISIBLE_DEVICES=$rank "$PY" tests/distributed_case.py $rank 2 $port "$dir/2-$rank.npz" &
  done
  wait || return 1
  "$PY" - "$dir" <<'PYEOF'
import sys
import numpy as np
d = sys.argv[1]
one, a, b = (np.load(f"{d}/{n}.npz") for n in ("1-0", "2-0", "2-1"))
for engine in ("both", "ghost", "ghost_two_pass"):
    rel = {p: float(np.linalg.norm(a[f"{engine}_{p}"] - one[f"{engine}_{p}"])
                    / np.linalg.norm(one[f"{engine}_{p}"])) for p in ("sum", "update", "final")}
    same = bool(np.array_equal(a[f"{engine}_hash"], b[f"{engine}_hash"]))
    print(f"{engine:15s} 2 processes ÷ 1: sum {rel['sum']:.1e}, update {rel['update']:.1e}, "
          f"10 steps {rel['final']:.1e}; parameters bit-identical on both processes: {same}")
PYEOF
}

if (( GPUS >= 2 )); then
  echo "== exact"; exact 2>>"$LOG" | tee -a "$LOG" | sed 's/^/   /'
else
  echo "== exact: skipped (one GPU: NCCL takes one process per GPU)"
fi

counts=1; for p in 2 4 8; do (( p <= GPUS )) && counts+=",$p"; done
if (( GPUS >= 2 )); then
  phase gpus "$PY" -m ablation.run -m experiment=scaling "${COMMON[@]}" batch_size=1024 \
      distributed.processes="$counts"
else
  echo "== gpus: skipped (one GPU)"
fi
JAX_PLATFORMS=cpu phase cpu "$PY" -m ablation.run -m experiment=scaling "${COMMON[@]}"

grep -hE '^\[(ok|error|oom|timeout)' "$LOG" | sed 's/^/   /'
sed -n '/=== scaling over processes/,/^(× 1 process/p' "$LOG"
echo "records: $(find "$OUTDIR" -name result.json 2>/dev/null | wc -l)"
