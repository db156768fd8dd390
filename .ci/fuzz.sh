#!/usr/bin/env bash
# Fuzz the HTTP API against its own OpenAPI document with Schemathesis.
#
# Builds the debug binary, starts `order-service api` over a fresh database on
# a free port, runs Schemathesis against http://127.0.0.1:<port>/openapi.json
# (no 5xx; statuses, content types, headers and bodies as documented; invalid
# input rejected; wrong methods a 405 with Allow), then stops the API with
# SIGTERM and drops the database. Exits non-zero when Schemathesis reports a
# failure or does not finish in time, or the API does not stop cleanly.
#
# Needs Postgres on 127.0.0.1:5432 (user postgres, trust auth). RabbitMQ is
# optional: without it /readyz answers 503, which the document allows.
#
# Knobs (environment): FUZZ_MAX_EXAMPLES (per operation and phase, default
# 200), FUZZ_SEED (default 8), FUZZ_TIME_LIMIT (seconds for Schemathesis,
# default 150), FUZZ_CHECKS (its --checks), FUZZ_REPORT_DIR (keep its JUnit
# and NDJSON reports there).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES=${FUZZ_MAX_EXAMPLES:-200}
SEED=${FUZZ_SEED:-8}
TIME_LIMIT=${FUZZ_TIME_LIMIT:-150}
# Every check that applies but positive_data_acceptance: a schema-valid body
# sent with an Idempotency-Key already used for another body is rightly a 422,
# which that check counts as a failure.
CHECKS=${FUZZ_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,missing_required_header,unsupported_method,allow_header_conformance,ensure_resource_availability,use_after_free}
BINARY=target/debug/order-service
PSQL=(psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt)
DB="osfuzz_$$"

log() { printf '\n==> %s\n' "$*"; }

workdir=$(mktemp -d)
api_pid=""
fuzz_pid=""
db_created=""

stop_api() { # SIGTERM, then up to 35 s to exit (its own shutdown deadline is 30 s)
    local pid=$api_pid status=0
    [ -n "$pid" ] || return 0
    api_pid=""
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 350); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "error: the API did not stop within 35 s of SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        return 1
    fi
    wait "$pid" || status=$?
    return "$status"
}

cleanup() {
    local status=$?
    trap - INT TERM
    if [ -n "$fuzz_pid" ]; then # interrupted mid-run: `timeout` passes TERM on
        kill -TERM "$fuzz_pid" 2>/dev/null || true
        wait "$fuzz_pid" 2>/dev/null || true
    fi
    stop_api || true
    if [ -n "$db_created" ]; then
        "${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    fi
    rm -rf "$workdir"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "Build"
cargo build --quiet

log "Schemathesis $SCHEMATHESIS_VERSION"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "schemathesis==$SCHEMATHESIS_VERSION"

log "Database $DB"
# Databases of earlier runs that were killed before they could clean up.
for stale in $("${PSQL[@]}" -c "SELECT datname FROM pg_database WHERE datname ~ '^osfuzz_[0-9]+$'"); do
    if ! kill -0 "${stale#osfuzz_}" 2>/dev/null; then
        "${PSQL[@]}" -c "DROP DATABASE IF EXISTS $stale WITH (FORCE)" || true
    fi
done
"${PSQL[@]}" -c "CREATE DATABASE $DB"
db_created=1

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"

log "API on $base"
DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB" HTTP_ADDR="127.0.0.1:$port" RUST_LOG=warn \
    "$BINARY" api >"$workdir/api.log" 2>&1 &
api_pid=$!
for _ in $(seq 300); do
    if curl -fsS -o /dev/null "$base/healthz" 2>/dev/null; then break; fi
    if ! kill -0 "$api_pid" 2>/dev/null; then
        echo "error: the API exited during start-up:" >&2
        cat "$workdir/api.log" >&2
        exit 1
    fi
    sleep 0.1
done
curl -fsS -o /dev/null "$base/healthz" || { echo "error: the API did not come up in 30 s" >&2; exit 1; }

log "Fuzzing ($MAX_EXAMPLES examples per operation, seed $SEED, at most ${TIME_LIMIT}s)"
# In the background so that a signal reaches our trap at once; from the scratch
# directory so that Schemathesis leaves nothing in the tree.
(
    cd "$workdir"
    exec timeout --signal=INT --kill-after=10 "$TIME_LIMIT" \
        schemathesis run "$base/openapi.json" \
        --checks "$CHECKS" \
        --max-examples "$MAX_EXAMPLES" \
        --seed "$SEED" \
        --workers 1 \
        --request-timeout 10 \
        --generation-database none \
        --no-color \
        --report junit,ndjson --report-dir "$workdir/report"
) &
fuzz_pid=$!
fuzz_status=0
wait "$fuzz_pid" || fuzz_status=$?
fuzz_pid=""
if [ "$fuzz_status" -eq 124 ]; then
    echo "error: Schemathesis did not finish within ${TIME_LIMIT}s" >&2
fi

api_status=0
stop_api || api_status=$?
if [ "$api_status" -ne 0 ]; then
    echo "error: the API exited with status $api_status after SIGTERM" >&2
fi
if [ -s "$workdir/api.log" ]; then
    log "API log (warnings and errors, last 50 lines)"
    tail -n 50 "$workdir/api.log"
fi

# One line for the CI log, from the JUnit report (operations, failures) and
# the NDJSON event stream (test cases, requests, statuses answered).
python3 - "$workdir/report" <<'EOF' || true
import collections, json, pathlib, sys
import xml.etree.ElementTree as ET

report = pathlib.Path(sys.argv[1])
operations, failing = 0, []
for junit in report.glob("*.xml"):
    for case in ET.parse(junit).getroot().iter("testcase"):
        if not case.get("name", "").startswith("Stateful"):
            operations += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failing.append(case.get("name"))
cases = requests = 0
statuses = collections.Counter()
for ndjson in report.glob("*.ndjson"):
    for line in ndjson.read_text().splitlines():
        recorder = json.loads(line).get("ScenarioFinished", {}).get("recorder", {})
        cases += len(recorder.get("cases", {}))
        for interaction in recorder.get("interactions", {}).values():
            requests += 1
            if interaction.get("response"):
                statuses[interaction["response"]["status_code"]] += 1
answered = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items()))
print(f"fuzz summary: {operations} operations, {cases} test cases, {requests} requests "
      f"({answered}); failing: {', '.join(failing) or 'none'}")
EOF

if [ -n "${FUZZ_REPORT_DIR:-}" ]; then
    mkdir -p "$FUZZ_REPORT_DIR"
    cp -r "$workdir/report/." "$FUZZ_REPORT_DIR/" 2>/dev/null || true
fi

if [ "$fuzz_status" -ne 0 ] || [ "$api_status" -ne 0 ]; then
    echo "fuzz: FAILED (schemathesis exit $fuzz_status, API exit $api_status)" >&2
    exit 1
fi
echo "fuzz: passed"
