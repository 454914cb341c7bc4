# Timed steps for .ci/run and scripts/test (sourced, not run).
#
#   step "what it does" command [args...]
#
# prints a heading, runs the command under the caller's `set -e`, and
# records its wall time. The outermost script that sources this file owns
# the record: when it exits (passing or not) it prints every step's time,
# nested scripts' steps included, and the total, so a slower CI shows
# where. A step that fails is marked FAILED in the table.

if [ -z "${TETHER_STEP_LOG:-}" ]; then
  TETHER_STEP_LOG=$(mktemp "${TMPDIR:-/tmp}/tether-steps.XXXXXX")
  export TETHER_STEP_LOG
  tether_steps_owner=1
else
  tether_steps_owner=0
fi
tether_step_name=
tether_step_start=0

step() {
  tether_step_name=$1
  shift
  tether_step_start=$SECONDS
  printf '\n==> %s\n' "$tether_step_name"
  "$@"
  printf '%s\t%d\tok\n' "$tether_step_name" $((SECONDS - tether_step_start)) >>"$TETHER_STEP_LOG"
  tether_step_name=
}

tether_steps_exit() {
  local status=$?
  if [ -n "$tether_step_name" ]; then
    printf '%s\t%d\tFAILED\n' "$tether_step_name" $((SECONDS - tether_step_start)) >>"$TETHER_STEP_LOG"
  fi
  if [ "$tether_steps_owner" = 1 ]; then
    printf '\n==> time per step (wall clock)\n'
    awk -F'\t' '{ printf "%6ds  %-6s  %s\n", $2, ($3 == "ok" ? "" : $3), $1 }' "$TETHER_STEP_LOG"
    printf '%6ds          total (%s)\n' "$SECONDS" "$([ "$status" = 0 ] && echo passed || echo "FAILED, exit $status")"
    rm -f "$TETHER_STEP_LOG"
  fi
  return "$status"
}
trap tether_steps_exit EXIT
