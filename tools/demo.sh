#!/usr/bin/env bash
# The main job end to end, offline, on the embedded default: set up .venv, start the job service on SQLite in a
# scratch folder, build the tiny model and a sample dataset, submit a job with train-diffuser --follow, check its
# status, download the results, load them into the base pipeline and render a sample grid, stop the service.
# Usage: bash tools/demo.sh [WORKDIR]   (default demo-output; CEREBRIUM_FT_DEMO_PORT picks the port, default 8642)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${CEREBRIUM_FT_SKIP_SETUP:-}" = 1 ] || bash tools/setup.sh
CFT="$PWD/.venv/bin/cerebrium-ft"
mkdir -p "${1:-demo-output}"; WORK=$(cd "${1:-demo-output}" && pwd)
PORT=${CEREBRIUM_FT_DEMO_PORT:-8642}
export CEREBRIUM_FT_URL="http://127.0.0.1:$PORT" CEREBRIUM_FT_CACHE="$WORK/cache" XDG_CONFIG_HOME="$WORK/config"

echo "== 1. the embedded default model and a sample dataset"
[ -f "$WORK/tiny-sd/model_index.json" ] || "$CFT" tiny-model "$WORK/tiny-sd"
[ -d "$WORK/sample-dataset" ] || "$CFT" sample-dataset "$WORK/sample-dataset" --size 64
"$CFT" check-dataset "$WORK/sample-dataset" --size 64

echo "== 2. the job service, on SQLite in $WORK/server"
rm -rf "$WORK/server"
"$CFT" serve --port "$PORT" --data-dir "$WORK/server" --model-dir "$WORK/tiny-sd" > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "job service on" "$WORK/serve.log" 2>/dev/null && break; sleep 0.2; done
KEY=$(grep -o 'cft_[A-Za-z0-9_-]*' "$WORK/serve.log" | head -1)
PROJECT=$(grep -o 'p_[0-9a-f]*' "$WORK/serve.log" | head -1)
[ -n "$KEY" ] || { cat "$WORK/serve.log"; exit 1; }
"$CFT" login "$KEY" --url "$CEREBRIUM_FT_URL"

echo "== 3. train-diffuser --follow"
"$CFT" train-diffuser robot "$KEY" "$WORK/tiny-sd" "$WORK/sample-dataset" "a photo of sks robot" --follow \
    --training-args '{"resolution": 64, "max_train_steps": 60, "learning_rate": 1e-3, "validation_epochs": 5, "num_validation_images": 2}' \
    | tee "$WORK/train-diffuser.log"
JOB=$(tail -n 1 "$WORK/train-diffuser.log" | cut -d: -f1)

echo "== 4. check-job-status, get-most-recent-jobs, download-model"
"$CFT" check-job-status "$JOB" "$KEY"
"$CFT" get-most-recent-jobs "$PROJECT" "$KEY"
"$CFT" download-model "$JOB" "$KEY" --output "$WORK/$JOB.zip"

echo "== 5. the LoRA loaded into its base pipeline"
"$CFT" generate "$WORK/$JOB.zip" "a photo of sks robot" --model "$WORK/tiny-sd" -n 4 --steps 20 --output "$WORK/samples.png"  # the zip names the service's model folder by name: where it is here
echo "Done: results in $WORK/$JOB.zip, images in $WORK/samples.png (the tiny model's weights are random, so they are noise)"
