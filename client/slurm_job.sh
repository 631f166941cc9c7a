#!/bin/bash
@SBATCH_OPTIONS@

# A psana-ipc job script, written by `psana-ipc slurm` from the template
# psana_ipc/client/slurm_job.sh, whose placeholders (upper-case names between
# at signs) it fills with shell-quoted words, integers and the #SBATCH lines.
SERVER_ENV=@SERVER_ENV@
CLIENT_ENV=@CLIENT_ENV@
SERVER_ARGS=(@SERVER_ARGS@)
CLIENT=(@CLIENT@)
LOG_DIR=@LOG_DIR@
READY_TIMEOUT=@READY_TIMEOUT@
STOP_TIMEOUT=@STOP_TIMEOUT@
REQUEUE=@REQUEUE@  # 1: requeue the job when the client exits RESUME_EXIT
RESUME_EXIT=@RESUME_EXIT@
WARNING_SIGNAL=@WARNING_SIGNAL@  # the time-limit warning (#SBATCH --signal), passed on to the client
SERVER_NODES=@SERVER_NODES@

# Everything below is the same for every job.
set -u

# A `bash -c` program that activates an environment, then execs its arguments there: each side
# runs in a fresh shell, so the server's and the client's environments never mix.
activating() {  # activating WHICH ACTIVATION
  printf '%s\n' "$2" \
    "[ \$? = 0 ] || { echo 'psana-ipc: cannot activate the $1 environment' >&2; exit 127; }" \
    'exec "$@"'
}

ended_within() {  # ended_within PID SECONDS: false if PID is still running after SECONDS
  local tenths=$(( $2 * 10 ))
  while kill -0 "$1" 2>/dev/null; do
    (( tenths-- > 0 )) || return 1
    sleep 0.1
  done
}

ready_address() {  # ready_address READY_FILE: the address a server's ready file gives
  sed -n 's/.*"address": *"\([^"]*\)".*/\1/p' "$1"
}

# One node's server, with a ready file named by host: on a node-local UNIX socket, or with no
# SOCKET on the node's address (a free port) for clients on other nodes, with the token file
# $RUN_DIR/token. SIGUSR1 (which srun forwards as it is, where it turns SIGTERM into SIGKILL) or
# SIGTERM ends the wait below and stops the server whatever state it is in: a shutdown request,
# then SIGTERM, then SIGKILL, then `psana-ipc cleanup` for what a killed server left in /dev/shm.
serve_node() {  # serve_node SERVER_ENV CLIENT_ENV SOCKET RUN_DIR STOP_TIMEOUT [ISERVER OPTION...]
  local socket=$3 run_dir=$4 limit=$5 host pid rc address listen
  local in_server=(bash -c "$(activating server "$1")" in-server-env)
  local in_client=(bash -c "$(activating client "$2")" in-client-env)
  shift 5
  host=$(hostname)
  listen=(--unix "$socket")
  [ -n "$socket" ] || listen=(--host "$host" --port 0 --token-file "$run_dir/token")
  trap : USR1 TERM INT HUP
  # srun delivers SIGUSR1 to the whole task; it is meant for this function, so iserver ignores it
  (trap '' USR1; exec "${in_server[@]}" iserver "${listen[@]}" \
    --ready-file "$run_dir/ready-$host.json" "$@") >"$run_dir/server-$host.log" 2>&1 &
  pid=$!
  wait "$pid"  # returns early on a signal, and then the server may still run
  if kill -0 "$pid" 2>/dev/null; then
    address=unix:$socket
    [ -n "$socket" ] || address=$(ready_address "$run_dir/ready-$host.json")
    timeout "$limit" "${in_client[@]}" psana-ipc stop --address "$address" >/dev/null 2>&1
    ended_within "$pid" "$limit" || { kill -TERM "$pid"; ended_within "$pid" "$limit"; } \
      || kill -KILL "$pid"
  fi
  wait "$pid"
  rc=$?
  "${in_client[@]}" psana-ipc cleanup >/dev/null
  [ -z "$socket" ] || rm -f "$socket"
  rm -f "$run_dir/ready-$host.json"
  return "$rc"
}

wait_ready() {  # until every node's server has written its ready file
  local deadline=$(( SECONDS + READY_TIMEOUT )) ready
  while :; do
    ready=$(compgen -G "$RUN_DIR/ready-*.json" | wc -l)
    [ "$ready" -ge "$NODES" ] && return 0
    if ! kill -0 "$SERVERS_PID" 2>/dev/null; then
      echo "psana-ipc: iserver exited before it was ready; its log:" >&2
      tail -n 30 "$RUN_DIR"/server-*.log >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "psana-ipc: $ready of $NODES servers ready after ${READY_TIMEOUT}s; logs in $RUN_DIR" >&2
      return 1
    fi
    sleep 0.2
  done
}

finish() {  # on every exit: stop the client if it still runs, then the servers; keep the exit code
  local rc=$?
  trap '' TERM INT HUP "$WARNING_SIGNAL"
  if [ -n "$CLIENT_PID" ] && kill -0 "$CLIENT_PID" 2>/dev/null; then
    kill -TERM "$CLIENT_PID"
    ended_within "$CLIENT_PID" "$STOP_TIMEOUT" || kill -KILL "$CLIENT_PID"
  fi
  if [ -n "$SERVERS_PID" ]; then
    kill -USR1 "$SERVERS_PID" 2>/dev/null
    wait "$SERVERS_PID" || echo "psana-ipc: a server ended badly; logs in $RUN_DIR" >&2
  fi
  rm -f "$RUN_DIR"/ready-*.json "$RUN_DIR/token"
  if [ "$REQUEUE" = 1 ] && [ "$rc" = "$RESUME_EXIT" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "psana-ipc: the client stopped to be resumed; requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$rc"
}

warn_client() {  # pass the time-limit warning on to the client (srun passes it to every task)
  if [ -n "$CLIENT_PID" ]; then kill -s "$WARNING_SIGNAL" "$CLIENT_PID" 2>/dev/null; fi
}

JOB=${SLURM_JOB_ID:-local-$$}
RUN_DIR=$LOG_DIR/psana-ipc-$JOB  # ready files and server logs, seen from every node
NODES=1 ON_NODES=() ON_TASKS=() CLIENT_PID='' SERVERS_PID=''
if [ "$SERVER_NODES" -gt 0 ]; then
  # Servers on nodes of their own (the job's second component), reached over TCP with a token:
  # PSANA_IPC_ADDRESS lists them once they are ready.
  SOCKET=''
  export PSANA_IPC_TOKEN_FILE=$RUN_DIR/token
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    NODES=$SERVER_NODES
    ON_NODES=(srun --het-group=1 --overlap --whole --kill-on-bad-exit=1 --nodes="$NODES"
              --ntasks="$NODES" --ntasks-per-node=1)
    if [ "${SLURM_NTASKS_HET_GROUP_0:-1}" -gt 1 ]; then  # else the client runs here, on its node
      ON_TASKS=(srun --het-group=0 --overlap --kill-on-bad-exit=1
                --cpus-per-task="${SLURM_CPUS_PER_TASK_HET_GROUP_0:-1}")
    fi
  fi
else
  SOCKET=${TMPDIR:-/tmp}/psana-ipc-$JOB.sock  # the same path on every node, each its own server
  export PSANA_IPC_ADDRESS=unix:$SOCKET
  if [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
    NODES=$SLURM_JOB_NUM_NODES
    ON_NODES=(srun --overlap --whole --kill-on-bad-exit=1 --nodes="$NODES" --ntasks="$NODES"
              --ntasks-per-node=1)
    ON_TASKS=(srun --overlap --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
  fi
fi
trap finish EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP
trap '' "$WARNING_SIGNAL"  # the servers start ignoring the time-limit warning: it is the client's

mkdir -p "$RUN_DIR" || exit 1
rm -f "$RUN_DIR"/ready-*.json
if [ -z "$SOCKET" ]; then  # the token, readable by this user only, made before any server reads it
  (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$PSANA_IPC_TOKEN_FILE") || exit 1
fi
"${ON_NODES[@]}" bash -c "$(declare -f activating ended_within ready_address serve_node)"$'\n''serve_node "$@"' \
  serve-node "$SERVER_ENV" "$CLIENT_ENV" "$SOCKET" "$RUN_DIR" "$STOP_TIMEOUT" "${SERVER_ARGS[@]}" &
SERVERS_PID=$!
trap warn_client "$WARNING_SIGNAL"
wait_ready || exit 1
if [ -z "$SOCKET" ]; then
  ADDRESSES=()
  for ready in "$RUN_DIR"/ready-*.json; do ADDRESSES+=("$(ready_address "$ready")"); done
  PSANA_IPC_ADDRESS=$(IFS=,; echo "${ADDRESSES[*]}")
  export PSANA_IPC_ADDRESS
fi
echo "psana-ipc: $NODES server(s) ready at $PSANA_IPC_ADDRESS; running:" \
  "$(printf '%q ' "${CLIENT[@]}")" >&2
"${ON_TASKS[@]}" bash -c "$(activating client "$CLIENT_ENV")" in-client-env "${CLIENT[@]}" &
CLIENT_PID=$!
while :; do  # a trapped signal (the warning) ends a wait early: wait again until the client ends
  wait "$CLIENT_PID"
  rc=$?
  kill -0 "$CLIENT_PID" 2>/dev/null || exit "$rc"
done
