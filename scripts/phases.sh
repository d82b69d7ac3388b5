# Shared by the GPU scripts (sourced): phases under one deadline, records packed after each.
# Needs DEADLINE (epoch seconds), LOG, OUTDIR; OUT (optional) receives records.tgz;
# MIN_LEFT_S (default 15): a phase with less time left is skipped.

pack() {
  [[ -n "${OUT:-}" && -d "$OUTDIR" ]] || return 0
  tar czf "$OUT/records.tgz" --exclude=.hydra --exclude='*.spec.json' --exclude='*.out.json' \
      --exclude='*.log' "$OUTDIR"
}

# phase NAME CMD...: run CMD until the deadline; its output goes to $LOG.
phase() {
  local name=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < ${MIN_LEFT_S:-15} )); then echo "== $name: skipped (deadline)"; return 0; fi
  echo "== $name (${left} s left)"
  timeout -k 10 "$left" "$@" >>"$LOG" 2>&1
  local rc=$?
  (( rc == 124 )) && echo "   stopped at the deadline"
  (( rc != 0 && rc != 124 )) && echo "   exit $rc (see $LOG)"
  pack
}
