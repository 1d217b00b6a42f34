#!/usr/bin/env bash
# A local multi-node Ray cluster for trying genpi's cluster path on one machine: a head and
# N worker nodes, each its own `ray start` process tree, all on 127.0.0.1 with ports of their
# own and a temporary Ray folder that is removed at the end.
#
#   cluster/local-cluster.sh [--workers N] [--cpus-per-worker C] [-- COMMAND [ARGS...]]
#
# With a COMMAND: start the cluster, run COMMAND with RAY_ADDRESS (the GCS address, for
# drivers) and RAY_DASHBOARD_ADDRESS (http://..., for `ray job submit --address`) exported,
# stop the cluster and exit with COMMAND's status. Without one: start it, print the
# addresses, and keep it up until Ctrl-C. Every process this script started is stopped on
# any exit (success, failure, Ctrl-C, TERM). Example, from the repository root:
#
#   cluster/local-cluster.sh -- bash -c 'ray job submit --address "$RAY_DASHBOARD_ADDRESS" \
#       --runtime-env cluster/runtime_env.yaml -- python jobs/internalize_many.py \
#       --manifest examples/prompts/french.yaml --config cluster/configs/cpu-dev.yaml --store /tmp/genpi-store'
#
# The head has no CPUs for tasks (num-cpus 0, as on the Kubernetes clusters): the job driver
# runs there and every actor and task of the job runs on the worker nodes. PYTHON (default:
# python3) picks the interpreter whose Ray is used; the processes inherit this environment.
set -uo pipefail

workers=2
cpus=2
object_store_bytes=$((200 * 1024 * 1024))
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    --cpus-per-worker) cpus="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "local-cluster.sh: unknown argument '$1' (use -- before the command)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
tmp="$(mktemp -d /tmp/genpi-ray.XXXXXX)"
pids=()

log() { echo "[local-cluster] $*" >&2; }

descendants() {  # every live descendant of the given pids
  local out="" frontier="$*" next
  while [ -n "$frontier" ]; do
    next=""
    for p in $frontier; do
      next="$next $(ps -o pid= --ppid "$p" 2>/dev/null | tr -s ' \n' ' ')"
    done
    next="$(echo $next)"
    out="$out $next"
    frontier="$next"
  done
  echo $out
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    local tree
    tree="$(descendants "${pids[@]}")"
    log "stopping ${#pids[@]} Ray node(s)"
    # SIGTERM to `ray start --block` shuts its node down (raylet, GCS, workers, agents).
    # Workers first, the head last.
    for ((i=${#pids[@]}-1; i>=0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
    for _ in $(seq 60); do
      local alive=0
      for p in "${pids[@]}" $tree; do kill -0 "$p" 2>/dev/null && alive=1; done
      [ "$alive" = 0 ] && break
      sleep 0.5
    done
    # Whatever is left of this cluster: the process trees above, and any process that names
    # this cluster's private temp folder on its command line (daemons re-parented to init).
    local left
    left="$(for p in "${pids[@]}" $tree; do kill -0 "$p" 2>/dev/null && echo "$p"; done; pgrep -f -- "$tmp" || true)"
    for p in $left; do
      [ "$p" != "$$" ] && kill -KILL "$p" 2>/dev/null && log "killed leftover process $p"
    done
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Free ports: 6 single ports per node, plus a range of 40 for each node's worker processes.
read -r -a ports <<< "$("$PY" - "$((workers + 1))" <<'PYEOF'
import random, socket, sys
nodes = int(sys.argv[1])
held, out = [], []
def free(port=0):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); held.append(s); return s.getsockname()[1]
for _ in range(nodes * 7 + 2):
    out.append(free())
taken = set(out)
for _ in range(nodes):
    while True:
        lo = random.randrange(20000, 30000)
        try:
            for p in range(lo, lo + 40):
                if p in taken: raise OSError
                free(p)
        except OSError:
            continue
        out += [lo, lo + 39]; taken.update(range(lo, lo + 40)); break
print(" ".join(map(str, out)))
PYEOF
)"
if [ ${#ports[@]} -ne $(( (workers + 1) * 9 + 2 )) ]; then log "could not pick free ports"; exit 1; fi
gcs_port=${ports[0]}; dashboard_port=${ports[1]}
# Loopback only. Ray maps 127.0.0.1 to the machine's outward address unless its multi-node
# support is switched off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, exported below for every Ray
# process and driver), and with it off `ray start --address` refuses to add a worker node.
# So `ray start` runs through this wrapper, which lifts that one check in the CLI only.
RAY_START='import sys, types
import ray._private.ray_constants as rc
import ray.scripts.scripts as scripts
class _Constants(types.ModuleType):
    def __getattr__(self, name):
        return getattr(rc, name)
proxy = _Constants("ray_constants")
proxy.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = proxy
sys.argv[0] = "ray"
scripts.main()'
ray_start() {  # ray_start NODE_INDEX LOGNAME ARGS...: one node, its own ports, in the background
  local n=$1 name=$2; shift 2
  local b=$((2 + n * 7)) r=$((2 + (workers + 1) * 7 + n * 2))
  # A Ray folder per node: nodes sharing one would share runtime_resources/, and one node's
  # runtime env agent deletes a working_dir another node's job is still importing from.
  mkdir -p "$tmp/n$n"
  "$PY" -c "$RAY_START" start --block --disable-usage-stats --temp-dir "$tmp/n$n" --node-ip-address 127.0.0.1 \
    --node-manager-port "${ports[$b]}" --object-manager-port "${ports[$((b+1))]}" \
    --dashboard-agent-grpc-port "${ports[$((b+2))]}" --dashboard-agent-listen-port "${ports[$((b+3))]}" \
    --metrics-export-port "${ports[$((b+4))]}" --runtime-env-agent-port "${ports[$((b+5))]}" \
    --min-worker-port "${ports[$r]}" --max-worker-port "${ports[$((r+1))]}" \
    --object-store-memory "$object_store_bytes" "$@" > "$tmp/$name.log" 2>&1 &
  pids+=($!)
}

export RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# One malloc arena for every Ray process (as genpi.rayinit gives a local Ray): Ray Train's
# train function runs on a second thread, whose own arena made a CPU step 1.2-1.3x slower.
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-1}"
# A token of its own (Ray's token authentication), so the cluster neither depends on nor
# touches ~/.ray/auth_token; every process started here, and COMMAND, inherits it.
( umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$tmp/auth_token" )
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$tmp/auth_token"
unset RAY_AUTH_TOKEN
log "temp folder $tmp; head on 127.0.0.1:$gcs_port, dashboard on http://127.0.0.1:$dashboard_port"
ray_start 0 head --head --port "$gcs_port" --num-cpus 0 --dashboard-host 127.0.0.1 \
  --dashboard-port "$dashboard_port" --ray-client-server-port "${ports[$((2 + 6))]}"
# The head must be up before the workers join it.
if ! "$PY" - "$dashboard_port" "${pids[0]}" <<'PYEOF'
import os, sys, time, urllib.error, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 120
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("head process exited")
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2).read()
        sys.exit(0)
    except urllib.error.HTTPError:  # answering (e.g. 401 under token authentication): up
        sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit("head not up after 120 s")
PYEOF
then
  log "head failed to start; its log:"; tail -n 30 "$tmp/head.log" >&2; exit 1
fi
# Workers one at a time: a raylet that is not registered within Ray's fixed 30 s (a busy
# machine starting several at once) makes `ray start` give up; such a worker is tried again.
for ((i=1; i<=workers; i++)); do
  for attempt in 1 2 3; do
    ray_start "$i" "worker-$i" --address "127.0.0.1:$gcs_port" --num-cpus "$cpus"
    pid=${pids[${#pids[@]}-1]}
    while kill -0 "$pid" 2>/dev/null && ! grep -q "Ray runtime started" "$tmp/worker-$i.log"; do sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && break
    log "worker $i failed to start (attempt $attempt); last lines of its log:"; tail -n 3 "$tmp/worker-$i.log" >&2
    unset 'pids[${#pids[@]}-1]'; pids=("${pids[@]}")
    [ "$attempt" = 3 ] && exit 1
  done
done
if ! "$PY" - "127.0.0.1:$gcs_port" "$((workers + 1))" <<'PYEOF'
import logging, sys, time
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
want, deadline = int(sys.argv[2]), time.time() + 120
while time.time() < deadline:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want:
        ips = sorted({n["NodeManagerAddress"] for n in alive})
        print(f"[local-cluster] {len(alive)} nodes up on {', '.join(ips)}: {sum(n['Resources'].get('CPU', 0) for n in alive):g} CPUs", file=sys.stderr)
        sys.exit(0)
    time.sleep(0.5)
sys.exit(f"only {len(alive)} of {want} nodes joined in 120 s")
PYEOF
then
  for f in "$tmp"/worker-*.log; do log "$f:"; tail -n 20 "$f" >&2; done; exit 1
fi

export RAY_ADDRESS="127.0.0.1:$gcs_port"
export RAY_DASHBOARD_ADDRESS="http://127.0.0.1:$dashboard_port"
if [ $# -eq 0 ]; then
  log "cluster up: RAY_ADDRESS=$RAY_ADDRESS RAY_DASHBOARD_ADDRESS=$RAY_DASHBOARD_ADDRESS (Ctrl-C stops it)"
  wait "${pids[0]}"
  exit $?
fi
"$@"
