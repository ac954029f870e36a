#!/usr/bin/env bash
# Multi-machine sweep, for real, on one host (`make test-distributed`).
#
# What users do across machines, here with two "machines" (separate working directories, data roots and
# feature caches) on 127.0.0.1:
#   * a throwaway PostgreSQL cluster (initdb in a temp dir, 127.0.0.1 only) with databases `optuna` and `mlflow`;
#   * `mlflow server` with the PostgreSQL backend store and proxied artifacts (--artifacts-destination),
#     so workers upload checkpoints, heatmaps and models through the server;
#   * a one-off preparation, `fastflow sweep --timeout 0` (no trial: creates the Optuna tables, the study, the
#     MLflow experiment and the study's parent run, which race when two machines create them at the same instant);
#   * two `fastflow sweep` processes on the same space (hence the same study), each with
#     OPTUNA_STORAGE=postgresql+psycopg2://... and MLFLOW_TRACKING_URI=http://127.0.0.1:<port>;
#     machine B starts once machine A runs its first trial (processes that load the study before any trial
#     exists draw the same TPE seed);
#   * tests/e2e/test_distributed.py then checks through the public APIs: all trials in PostgreSQL, one parent run
#     with every trial as a child on the server, artifacts downloadable through the server, and
#     models:/fastflow-synthetic@champion loadable with mlflow.pyfunc.load_model.
# Everything (processes, temp dir) is cleaned up on exit; KEEP=1 keeps the temp dir for inspection.
#
# Knobs: TRIALS_PER_WORKER (2), EPOCHS (2), WORKERS_B (1: processes on machine B), PGPORT (55432), KEEP (0),
# PREPARE=1 (0 skips the preparation: simultaneous starts then create two parent runs),
# JOIN=running (B starts once A runs a trial) | now (both at once: they can draw the same TPE seed; see sweep.load_study).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$REPO/.venv/bin}
PYTHON=$BIN/python
export MLFLOW_DISABLE_TELEMETRY=true
TRIALS_PER_WORKER=${TRIALS_PER_WORKER:-2}
EPOCHS=${EPOCHS:-2}
WORKERS_B=${WORKERS_B:-1}
PGPORT=${PGPORT:-55432}
JOIN=${JOIN:-running}
PREPARE=${PREPARE:-1}
KEEP=${KEEP:-0}
START=$(date +%s)

log() { printf '[distributed %4ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
port_free() { "$PYTHON" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no clash
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

[ -x "$PYTHON" ] || die "no venv at $BIN (run make install)"
"$PYTHON" -c "import psycopg2" 2>/dev/null || {
  log "installing psycopg2-binary into the venv"
  "$BIN/pip" install -q "$(grep -i '^psycopg2-binary' "$REPO/requirements.txt" || echo psycopg2-binary)"
}

# --- PostgreSQL binaries (Debian: /usr/lib/postgresql/<version>/bin) -----------------------------------------
pg_bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && { echo "$dir"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}
if ! PGBIN=$(pg_bindir); then
  log "PostgreSQL not found: apt-get install -y postgresql"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  PGBIN=$(pg_bindir) || die "PostgreSQL binaries still missing after apt-get install postgresql"
fi
log "PostgreSQL: $("$PGBIN/postgres" --version)"

# initdb/postgres refuse to run as root: run them as the `postgres` system user then.
as_pg() {
  if [ "$(id -u)" = 0 ]; then (cd "$WORK" && runuser -u postgres -- "$@"); else (cd "$WORK" && "$@"); fi
}

# --- temp dir and cleanup -------------------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastflow-distributed.XXXXXX")
chmod 755 "$WORK"
PGDATA="$WORK/pgdata"
PGSOCK="$WORK/pgsock"
MLFLOW_PID=""
WORKER_PIDS=()
PG_STARTED=0

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  for pid in "${WORKER_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null && { log "stopping worker $pid"; kill -TERM -- "-$pid" 2>/dev/null; }
  done
  if [ -n "$MLFLOW_PID" ] && kill -0 "$MLFLOW_PID" 2>/dev/null; then
    kill -TERM -- "-$MLFLOW_PID" 2>/dev/null
    for _ in $(seq 20); do kill -0 "$MLFLOW_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$MLFLOW_PID" 2>/dev/null
  fi
  [ "$PG_STARTED" = 1 ] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1
  if [ "$rc" != 0 ]; then
    for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "----- tail $f" >&2; tail -n 25 "$f" >&2; }; done
  fi
  if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  log "done (exit $rc) in $(($(date +%s) - START)) s"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- PostgreSQL: throwaway cluster on 127.0.0.1 only ----------------------------------------------------------
port_free "$PGPORT" || { PGPORT=$(free_port); log "port taken, PostgreSQL on $PGPORT instead"; }
mkdir -p "$PGDATA" "$PGSOCK"
touch "$WORK/postgres.log"
[ "$(id -u)" = 0 ] && chown postgres: "$PGDATA" "$PGSOCK" "$WORK/postgres.log"
as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -E UTF8 --locale=C --auth-local=trust --auth-host=scram-sha-256 \
  >"$WORK/initdb.log" 2>&1 || die "initdb (see initdb.log)"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $PGSOCK -c max_connections=200" start >/dev/null \
  || die "pg_ctl start (see postgres.log)"
PG_STARTED=1
PGPASSWORD_FF=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(12))')
as_pg "$PGBIN/psql" -q -h "$PGSOCK" -p "$PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
  -c "CREATE ROLE fastflow LOGIN PASSWORD '$PGPASSWORD_FF'" \
  -c "CREATE DATABASE optuna OWNER fastflow" -c "CREATE DATABASE mlflow OWNER fastflow" >/dev/null
# SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (v3); psycopg2-binary (requirements.txt) needs +psycopg2.
# The password stays out of URLs (and so out of `ps`, logs and MLflow tags): libpq reads it from PGPASSFILE.
export PGPASSFILE="$WORK/pgpass"
(umask 077 && echo "127.0.0.1:$PGPORT:*:fastflow:$PGPASSWORD_FF" >"$PGPASSFILE")
PG_URL="postgresql+psycopg2://fastflow@127.0.0.1:$PGPORT"
log "PostgreSQL on 127.0.0.1:$PGPORT (databases optuna, mlflow; role fastflow, password auth)"

# --- MLflow tracking server: PostgreSQL backend, proxied artifacts ---------------------------------------------
MLFLOW_PORT=$(free_port)
mkdir -p "$WORK/artifacts"
setsid "$BIN/mlflow" server --backend-store-uri "$PG_URL/mlflow" \
  --serve-artifacts --artifacts-destination "$WORK/artifacts" \
  --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2 >"$WORK/mlflow-server.log" 2>&1 &
MLFLOW_PID=$!
for _ in $(seq 240); do
  curl -fsS "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1 && break
  kill -0 "$MLFLOW_PID" 2>/dev/null || die "mlflow server exited (see mlflow-server.log)"
  sleep 1
done
curl -fsS "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null || die "mlflow server not healthy after 240 s"
log "mlflow server on http://127.0.0.1:$MLFLOW_PORT (backend PostgreSQL, artifacts proxied to $WORK/artifacts)"

# --- the same tiny space on both machines ---------------------------------------------------------------------
SPACE_NAME=tiny-distributed
STUDY="fastflow-synthetic-$SPACE_NAME"
for machine in a b; do
  mkdir -p "$WORK/machine-$machine/sweeps"
  cat >"$WORK/machine-$machine/sweeps/$SPACE_NAME.yaml" <<EOF
category: synthetic
preset: {type: categorical, choices: [efficientnet_lite0]}
presets_dir: $REPO/experiments
params:
  model.flow_steps: {type: int, low: 2, high: 4, step: 2}
  train.lr: {type: float, low: 5.0e-4, high: 2.0e-3, log: true}
  model.anomaly_map: {type: categorical, choices: [z2, nll]}
fixed:
  model.input_size: 64
  train.epochs: $EPOCHS
  train.batch_size: 8
  train.max_train_images: 16
  eval.heatmap_images: 2
  eval.eval_every: 1
pruner: median
EOF
done

export OPTUNA_STORAGE="$PG_URL/optuna"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"

start_worker() {  # machine, workers: `fastflow sweep` in the machine's own directory, as on another host
  local machine=$1 workers=$2 dir="$WORK/machine-$1"
  (cd "$dir" && exec setsid "$BIN/fastflow" sweep --space "sweeps/$SPACE_NAME.yaml" --root "$dir/data" \
      --trials "$TRIALS_PER_WORKER" --workers "$workers") >"$WORK/worker-$machine.log" 2>&1 &
  WORKER_PIDS+=($!)
  log "machine $machine: fastflow sweep --trials $TRIALS_PER_WORKER --workers $workers (pid $!)"
}

if [ "$PREPARE" = 1 ]; then  # once, from any machine: tables, study, experiment, parent run; no trial
  (cd "$WORK/machine-a" && "$BIN/fastflow" sweep --space "sweeps/$SPACE_NAME.yaml" --root "$WORK/machine-a/data" \
     --timeout 0 --no-promote) >"$WORK/prepare.log" 2>&1 || die "preparation failed (see prepare.log)"
  log "prepared: fastflow sweep --timeout 0 created study $STUDY and its parent run"
fi
start_worker a 1
[ "$JOIN" = now ] || {
# Machine B joins once A has created the study, experiment and parent run and is running a trial.
# (in the background + wait, so that a signal reaches the cleanup trap at once)
"$PYTHON" - "$STUDY" "${WORKER_PIDS[0]}" <<'EOF' &
import os, sys, time
import optuna
from optuna.trial import TrialState
optuna.logging.set_verbosity(optuna.logging.ERROR)
study_name, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 600
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("worker A exited")
    try:
        trials = optuna.load_study(study_name=study_name, storage=os.environ["OPTUNA_STORAGE"]).trials
        if any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in trials):
            sys.exit(0)
    except KeyError:  # study not created yet
        pass
    time.sleep(1)
sys.exit("timeout")
EOF
wait $! || die "machine A never started a trial (see worker-a.log)"
}
start_worker b "$WORKERS_B"

rcs=()
for pid in "${WORKER_PIDS[@]}"; do
  rc=0; wait "$pid" || rc=$?
  rcs+=("$rc")
done
WORKER_PIDS=()
log "workers finished: exit codes ${rcs[*]}"
for machine in a b; do echo "----- machine $machine: fastflow sweep output" >&2; cat "$WORK/worker-$machine.log" >&2; done
for rc in "${rcs[@]}"; do [ "$rc" = 0 ] || die "a worker failed"; done

# --- verification through the public APIs ---------------------------------------------------------------------
export FASTFLOW_DISTRIBUTED_STUDY="$STUDY"
export FASTFLOW_DISTRIBUTED_TRIALS=$((2 * TRIALS_PER_WORKER))
export FASTFLOW_DISTRIBUTED_EPOCHS="$EPOCHS"
export FASTFLOW_DISTRIBUTED_WORK="$WORK"
export FASTFLOW_DISTRIBUTED_PASSWORD="$PGPASSWORD_FF"
"$PYTHON" "$REPO/tests/e2e/test_distributed.py" >&2 || true  # the run tree, for the log
(cd "$REPO" && "$PYTHON" -m pytest -q -p no:cacheprovider -m "" "$REPO/tests/e2e/test_distributed.py") \
  || die "verification failed"
log "OK: $FASTFLOW_DISTRIBUTED_TRIALS trials from 2 machines in PostgreSQL and on the MLflow server"
