#!/usr/bin/env bash
# Run a hyperparameter search on Slurm: create the study and its MLflow parent run once (here), queue
# the workers as a job array against the shared study, and a finalize job that runs when they all end.
#
#   export STORAGE=postgresql+psycopg2://optuna@db-host:5432/optuna   # password: ~/.pgpass or PGPASSWORD
#   export MLFLOW_TRACKING_URI=http://login1:5000                      # an `mlflow server` the nodes reach
#   N_TRIALS=64 ARRAY=0-15%4 CONFIG=experiments/mimic3.yaml OVERRIDES="data.path=/data/mimic-iii" \
#       tuning/slurm/submit.sh
#
# Also read: STUDY (promptehr), OBJECTIVE, PRUNER, SEED, SPACE, VENV (activated in the jobs), PYTHON,
# LOG_DIR (logs/slurm), HEARTBEAT_INTERVAL (60) and GRACE_PERIOD (180) seconds, and the job resources
# GRES (gpu:1; "none" submits without a GPU request), CPUS_PER_TASK, MEM, TIME, PARTITION, ACCOUNT.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${STORAGE:?set STORAGE to the study storage: a PostgreSQL URL (or journal:/shared/fs/study.log)}"
export STORAGE STUDY="${STUDY:-promptehr}" PYTHON="${PYTHON:-python}"
export HEARTBEAT_INTERVAL="${HEARTBEAT_INTERVAL:-60}" GRACE_PERIOD="${GRACE_PERIOD:-180}"
LOG_DIR="${LOG_DIR:-logs/slurm}"
mkdir -p "$LOG_DIR"
if [ -n "${VENV:-}" ]; then source "$VENV/bin/activate"; fi

init=(--storage "$STORAGE" --study-name "$STUDY")
[ -n "${CONFIG:-}" ] && init+=(--config "$CONFIG")
[ -n "${OVERRIDES:-}" ] && init+=(--overrides "$OVERRIDES")
[ -n "${N_TRIALS:-}" ] && init+=(--n-trials "$N_TRIALS")
[ -n "${OBJECTIVE:-}" ] && init+=(--objective "$OBJECTIVE")
[ -n "${PRUNER:-}" ] && init+=(--pruner "$PRUNER")
[ -n "${SEED:-}" ] && init+=(--seed "$SEED")
[ -n "${SPACE:-}" ] && init+=(--space "$SPACE")
"$PYTHON" tuning/search.py init "${init[@]}"

resources=(--gres="${GRES:-gpu:1}")
[ -n "${CPUS_PER_TASK:-}" ] && resources+=(--cpus-per-task="$CPUS_PER_TASK")
[ -n "${MEM:-}" ] && resources+=(--mem="$MEM")
[ -n "${TIME:-}" ] && resources+=(--time="$TIME")
common=()
[ -n "${PARTITION:-}" ] && common+=(--partition="$PARTITION")
[ -n "${ACCOUNT:-}" ] && common+=(--account="$ACCOUNT")

array_job=$(sbatch --parsable "${common[@]}" "${resources[@]}" --array="${ARRAY:-0-15%4}" \
    --output="$LOG_DIR/search-%A_%a.out" tuning/slurm/search.sbatch)
array_job=${array_job%%;*}
finalize_job=$(sbatch --parsable "${common[@]}" ${MEM:+--mem="$MEM"} ${CPUS_PER_TASK:+--cpus-per-task="$CPUS_PER_TASK"} \
    --dependency=afterany:"$array_job" --output="$LOG_DIR/finalize-%j.out" tuning/slurm/finalize.sbatch)
finalize_job=${finalize_job%%;*}
echo "study $STUDY: workers = job array $array_job, finalize = job $finalize_job (logs in $LOG_DIR)"
echo "array_job=$array_job finalize_job=$finalize_job"
