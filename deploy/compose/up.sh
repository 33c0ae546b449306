#!/usr/bin/env bash
# One command for a local container cluster: builds the workspace's binaries,
# the image (FROM scratch, build-image.sh), starts docker-compose.yml and waits
# until the three agents are Ready.
#   deploy/compose/up.sh          start (or update) the cluster
#   deploy/compose/up.sh down     stop it and delete its volumes
# Environment: COMPOSE_PROJECT_NAME (default cohort), COHORT_IMAGE (default
# cohort-local:dev), COHORT_NET (the first three octets of its /24, default
# 10.213.7), COHORT_HTTP_PORT (the web page on 127.0.0.1, default 17080),
# COHORT_SKIP_BUILD=1 (use the binaries already in target/debug).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-cohort}"
export COHORT_IMAGE="${COHORT_IMAGE:-cohort-local:dev}"
compose() { docker-compose -f "$here/docker-compose.yml" "$@"; }

if [[ "${1:-}" == down ]]; then
    compose down -v --remove-orphans
    exit 0
fi
if [[ -z "${COHORT_SKIP_BUILD:-}" ]]; then
    (cd "$root" && cargo build --workspace --bins --quiet)
fi
"$here/build-image.sh" "$COHORT_IMAGE"
compose up -d --remove-orphans
cohort() { compose exec -T controller-1 cohort "$@"; }
deadline=$((SECONDS + ${COHORT_UP_TIMEOUT:-120}))
until [[ "$(cohort nodes -o json 2>/dev/null | grep -c '"state": "Ready"')" -ge 3 ]]; do
    if ((SECONDS > deadline)); then
        echo "up: the three agents were not Ready in time; docker-compose logs:" >&2
        compose logs --tail 30 >&2
        exit 1
    fi
    sleep 0.5
done
cohort nodes
cat <<USAGE

The cluster is up (project $COMPOSE_PROJECT_NAME). Try:
  docker-compose -f $here/docker-compose.yml exec controller-1 cohort submit --follow /jobs/hello.yaml
  docker-compose -f $here/docker-compose.yml exec controller-1 cohort submit /jobs/long.yaml
  docker-compose -f $here/docker-compose.yml stop agent-2      # the job fails, the other nodes are stopped
  web page: https://127.0.0.1:${COHORT_HTTP_PORT:-17080}/#token=\$(docker-compose -f $here/docker-compose.yml exec -T controller-1 cat /tls/admin.token)
Stop and delete everything: $here/up.sh down
USAGE
