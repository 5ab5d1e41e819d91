#!/usr/bin/env bash
# Start web, scheduler and one worker pool per queue (Procfile, via honcho); print how to use it.
set -euo pipefail
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
URL="http://$HOST:$PORT"
# Development settings (the settings default to DEBUG off and then require SECRET_KEY); honcho
# also reads a git-ignored .env, whose values win over these.
export DEBUG=${DEBUG:-true}
KEY=$(grep '^API key for acme:' .demo-credentials | awk '{print $NF}')

# The llm pool runs LLM_PROCESSES workers (one process's Python uses one core at a time).
.venv/bin/honcho start -f Procfile -c "llm=${LLM_PROCESSES:-2}" &
HONCHO=$!
trap 'kill $HONCHO 2>/dev/null; wait $HONCHO 2>/dev/null' INT TERM EXIT

for _ in $(seq 1 60); do
  curl -fsS "$URL/healthz" >/dev/null 2>&1 && break
  sleep 1
done

cat <<MSG

==========================================================================================
 Switchyard is running at $URL
   dashboard:  $URL/dashboard/   (operator / switchyard-operator)
   admin:      $URL/admin/   (operator / switchyard-operator)
   reviewer:   reviewer / switchyard-reviewer
   API key (tenant acme): $KEY

 Submit a run:
   curl -sS -X POST $URL/api/v1/runs/ \\
     -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\
     -d '{"workflow": "support-triage", "input": {"ticket": "I want a refund", "email": "ann@example.com"}}'
 Then follow it:  curl -sS $URL/api/v1/runs/<id>/ -H "Authorization: Bearer $KEY"
 Stop with Ctrl-C.
==========================================================================================

MSG
wait $HONCHO
