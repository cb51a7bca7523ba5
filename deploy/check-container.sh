#!/usr/bin/env bash
# The manual check of deploy/Containerfile (minutes, so not in CI): build the coordinator
# and provider images, run both, and get an answer through the official openai client from
# the host. Exits non-zero on any failure; removes its containers and volumes either way.
#
#   deploy/check-container.sh        (root; podman; PYTHON must have httpx and openai)
# Environment:
#   BASE    the base image (default localhost/idlegrid-base:bookworm, made by
#           deploy/local-base.sh when missing; docker.io/library/python:3.11-slim where a
#           registry is reachable)
#   PYTHON  the host's interpreter for the client side (default python3)
#   PORT    the host port the coordinator is published on (default 18700, loopback only)
#   BUILD_CA_BUNDLE  a PEM bundle pip must trust while building (a TLS-intercepting proxy's
#           CA); mounted for the build only, not kept in the images
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${BASE:-localhost/idlegrid-base:bookworm}"
PYTHON="${PYTHON:-python3}"
PORT="${PORT:-18700}"
coord_img=localhost/idlegrid:check
prov_img=localhost/idlegrid-provider:check
coord=idlegrid-check-coordinator
prov=idlegrid-check-provider
url="http://127.0.0.1:$PORT"

say() { printf '== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
teardown() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    for c in "$coord" "$prov"; do
      podman logs --tail 30 "$c" 2>&1 | sed "s/^/[$c] /" >&2 || true
    done
  fi
  podman rm -f -t 10 "$prov" "$coord" >/dev/null 2>&1 || true
  podman volume rm -f "$coord" "$prov" >/dev/null 2>&1 || true
  exit "$rc"
}
trap teardown EXIT
# Poll (never sleep-and-hope): run "$@" until it succeeds or $1 seconds pass.
wait_for() {
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || fail "$what: not within ${limit}s"
    sleep 1
  done
}

if ! podman image exists "$BASE"; then
  [ "$BASE" = localhost/idlegrid-base:bookworm ] || podman pull "$BASE"
  [ "$BASE" != localhost/idlegrid-base:bookworm ] || deploy/local-base.sh "$BASE"
fi

ca_args=()
if [ -n "${BUILD_CA_BUNDLE:-}" ]; then
  ca_args=(-v "$BUILD_CA_BUNDLE:/run/build-ca.pem:ro" --build-arg PIP_CERT=/run/build-ca.pem)
fi
build() {  # TAG EXTRAS
  local t0=$SECONDS
  podman build --format docker -f deploy/Containerfile --build-arg BASE="$BASE" \
    --build-arg EXTRAS="$2" "${ca_args[@]}" -t "$1" . >&2
  say "built $1 (EXTRAS=$2) in $((SECONDS - t0)) s, $(podman image inspect -f '{{.Size}}' "$1" \
    | awk '{printf "%.0f MB", $1 / 1e6}')"
}
build "$coord_img" postgres
build "$prov_img" llama,postgres

say "coordinator: published on $url"
podman rm -f "$coord" "$prov" >/dev/null 2>&1 || true
podman volume rm -f "$coord" "$prov" >/dev/null 2>&1 || true
podman run -d --name "$coord" -p "127.0.0.1:$PORT:8700" -v "$coord:/var/lib/idlegrid" \
  "$coord_img" >/dev/null
wait_for 120 "coordinator /healthz from the host" curl -sf "$url/healthz"
curl -sf "$url/healthz"; echo
curl -sf "$url/readyz" >/dev/null || fail "/readyz"
[ "$(podman exec "$coord" id -un)" = idlegrid ] || fail "the coordinator does not run as idlegrid"
# The image's HEALTHCHECK, run by podman now rather than at its 30 s interval.
podman healthcheck run "$coord" || fail "the image's healthcheck"
say "healthcheck: $(podman inspect -f '{{.State.Health.Status}}' "$coord")"
# The data dir is the volume: the operator key the coordinator wrote on first start is there.
opkey=$(podman exec "$coord" cat /var/lib/idlegrid/operator-key) || fail "no operator key in the volume"
podman exec "$coord" ls /var/lib/idlegrid | tr '\n' ' '; echo
api_key=$(podman exec "$coord" idlegrid keys create container-check --credits 50 --json \
  --coordinator http://127.0.0.1:8700 | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["api_key"])')

client() {  # the official openai client on the host; $1: "models" or "complete"
  OPENAI_BASE_URL="$url/v1" OPENAI_API_KEY="$api_key" "$PYTHON" - "$1" <<'PY'
import sys

import httpx
import openai

# trust_env=False: a proxy in the environment must not carry a loopback request away.
with httpx.Client(trust_env=False, timeout=120) as http, openai.OpenAI(http_client=http) as c:
    if sys.argv[1] == "models":
        print(" ".join(m.id for m in c.models.list().data) or "(no models yet)")
    else:
        done = c.completions.create(
            model="gemma3:270m", prompt="The capital of France is", max_tokens=8, temperature=0
        )
        assert done.choices[0].text and done.usage and done.usage.completion_tokens > 0, done
        print(f"{done.choices[0].text!r} ({done.usage.completion_tokens} tokens, "
              f"finish={done.choices[0].finish_reason}, request id {done._request_id})")
PY
}
say "/v1/models before a provider: $(client models)"

say "provider: host network, dialing $url"
podman run -d --name "$prov" --network host -v "$prov:/var/lib/idlegrid" "$prov_img" \
  provide --coordinator "$url" --name container-check --threads 2 >/dev/null
# Polled with curl: a Python with openai imported each second is most of two shared cores.
models_has_gemma() {
  curl -sf "$url/v1/models" -H "Authorization: Bearer $api_key" | grep -q '"gemma3:270m"'
}
t0=$SECONDS
wait_for 600 "the provider's model on /v1/models" models_has_gemma
say "/v1/models with the provider, $((SECONDS - t0)) s after its start: $(client models)"
# The inference stake: the operator grants 20 credits, the agent posts 5 of them itself.
node=$(curl -sf "$url/api/v1/status" -H "Authorization: Bearer $opkey" \
  | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["nodes"][0]["id"])')
curl -sf "$url/api/v1/admin/mint" -H "Authorization: Bearer $opkey" \
  -H 'content-type: application/json' \
  -d "{\"node_id\": \"$node\", \"amount\": 20000000, \"reference\": \"stake:container-check\"}" \
  >/dev/null || fail "mint for $node"
staked() {
  curl -sf "$url/api/v1/status" -H "Authorization: Bearer $opkey" | "$PYTHON" -c '
import json, sys
v = json.load(sys.stdin)
held = sum(x for a, x in v.get("balances", {}).items() if a.startswith("stake:" + sys.argv[1] + ":"))
sys.exit(0 if held >= v.get("inference_stake", 0) > 0 else 1)' "$node"
}
wait_for 120 "the provider's stake" staked
say "completion through the containers: $(client complete)"
say "OK"
