#!/usr/bin/env bash
# Issue 11 in one GPU lease: a setting's whole evidence (dense backbone + every method x seed) where the 2-core CPU
# needs ~1.7-2.7 h for the backbone alone and no session keeps runs/ (weights stay out of git). The job is the usual
# resumable `tpcvit evidence`; it is stopped cleanly (SIGINT) before DEADLINE seconds, then the report is written
# from the finished runs and ledger + report are packed into $OUT/evidence_<setting>.tgz (the device tool brings
# back files under $OUT). Unpack it in the repository root and commit; afterwards use `tpcvit evidence --report-only`
# on a CPU: a CPU re-run re-trains the backbone into other weights and would redo every run.
#
#   here, once:  mkdir -p .data && cp /usr/share/datasets/fashion-mnist/* .data/ && echo /.data/ >> .git/info/exclude
#   device:      run(command="bash scripts/gpu_evidence.sh configs/evidence_fmnist49.yaml 540", carry=[".data"])
#   dry run:     bash scripts/gpu_evidence.sh configs/evidence_fmnist49.yaml 60 OVERRIDES...   (any machine)
# Extra arguments are config overrides (key=value) passed to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=${1:?usage: gpu_evidence.sh CONFIG DEADLINE_SECONDS [key=value ...]}
DEADLINE=${2:?usage: gpu_evidence.sh CONFIG DEADLINE_SECONDS [key=value ...]}
shift 2
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DATA=${DATA:-.data}
ARGS=("$@")
if [ -d "$DATA" ] && [ -n "$(ls "$DATA" 2>/dev/null)" ]; then
  ARGS=("data.path=$DATA" "${ARGS[@]}")  # data.path is not part of any recipe: the ledger's runs stay comparable
fi
NAME=$($PY -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output'].rstrip('/').split('/')[-1])" "$CFG")
SETTING=${NAME#evidence_}
RESULTS=${RESULTS:-benchmarks/results/evidence_$SETTING}
mkdir -p "$(dirname "$RESULTS")"
$PY -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu (no GPU)')"
rc=0
timeout --signal=INT --kill-after=60 "$DEADLINE" $PY -m tpcvit evidence -c "$CFG" --out "$RESULTS" --quiet "${ARGS[@]}" \
  || rc=$?
echo "gpu_evidence: job ended with exit code $rc (124/130: stopped at the deadline; finished runs are in the ledger)"
$PY -m tpcvit evidence -c "$CFG" --out "$RESULTS" --quiet --report-only "${ARGS[@]}" > "$RESULTS.log" 2>&1 \
  || { cat "$RESULTS.log"; exit 1; }
tail -n 3 "$RESULTS.log"
if [ -n "${OUT:-}" ]; then
  # the dense backbone's kept copy (evidence.dense_copy) travels too: later fine-tunes start from it on any machine
  KEPT=$($PY -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1])).get('evidence', {}).get('dense_copy') or '')" \
    "$CFG")
  PARTIAL=""  # or the unfinished dense run's resumable state, when the deadline came during the dense stage
  [ -n "$KEPT" ] && [ -f "${KEPT%.safetensors}.partial.tar" ] && PARTIAL="${KEPT%.safetensors}.partial.tar"
  [ -n "$KEPT" ] && [ -f "$KEPT" ] || KEPT=""
  tar czf "$OUT/evidence_$SETTING.tgz" "${RESULTS}_runs" "$RESULTS".* ${KEPT:+"$KEPT"} ${PARTIAL:+"$PARTIAL"}
  echo "gpu_evidence: packed $OUT/evidence_$SETTING.tgz"
fi
