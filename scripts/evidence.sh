#!/usr/bin/env bash
# The pre-registered protocols (issue 16), in the background, in order: compass, smollm2-searchqa,
# compass-long. They run from a clone at one commit (the commit the kept runs ran at, else HEAD)
# and keep each finished run's records in THIS checkout's results/<protocol>/runs/, which are
# committed every 10 minutes, so a later session on a fresh machine resumes from the repository.
# The protocols are read at that commit too: they are pre-registered, a later edit does not reach
# runs already under way. Every run uses one torch thread on every machine, so a warm start rebuilt
# on another machine can match the fingerprint its seed's kept runs started from.
#   scripts/evidence.sh start | status | pause | resume | commit (the commit a start would run at)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${EVIDENCE_DIR:-$repo/../evidence}
protocols=(compass smollm2-searchqa compass-long)

pinned() {  # the commit of the kept runs (all must agree), else HEAD
  local c
  c=$(python3 - "$repo" <<'PY'
import json, pathlib, sys
seen = set()
for f in pathlib.Path(sys.argv[1], "results").glob("*/runs/*/seed*/run.json"):
    try:
        seen |= {a.get("commit") for a in json.loads(f.read_text()).get("attempts", [])}
    except ValueError:
        sys.exit(f"{f} is torn: remove its run directory (it is run again) and start again")
seen.discard(None)
if len(seen) > 1:
    sys.exit(f"kept runs ran at several commits: {sorted(seen)}")
print(seen.pop() if seen else "")
PY
) || return 1  # (set -e does not reach into $(...): say so here)
  echo "${c:-$(git -C "$repo" rev-parse HEAD)}"
}

case "${1:-status}" in
  start)
    if pgrep -f "steppo.cli compare" > /dev/null; then echo "already running (scripts/evidence.sh status)" >&2; exit 1; fi
    commit=$(pinned) || exit 1
    if [ ! -d "$work/.git" ]; then git clone -q "$repo" "$work"; fi
    git -C "$work" fetch -q "$repo" && git -C "$work" checkout -q "$commit"
    (cd "$work" && python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e ".[envs,models]")
    cat > "$work/driver.sh" <<DRV
#!/usr/bin/env bash
cd "$work"
keep() {  # commit results/ in the main checkout when it changed; say so when a commit fails
  git -C "$repo" add results/ && { git -C "$repo" diff --cached --quiet -- results/ ||
    git -C "$repo" commit -q -m "evidence: \$1" -- results/ ||
    echo "\$(date -u) commit failed (next try in 10 min)" >> "$work/driver.log"; }
}
( while sleep 600; do keep "kept run records (\$(ls -d $repo/results/*/runs/*/seed*/ 2>/dev/null | wc -l) runs)"; done ) &
loop=\$!
trap 'kill \$loop 2>/dev/null' EXIT
for p in ${protocols[*]}; do
  .venv/bin/python -m steppo.cli compare configs/compare/\$p.yaml --jobs 2 --threads 1 --out "$repo/results/\$p" >> "$work/\$p.log" 2>&1 || echo "\$(date -u) \$p failed (\$?)" >> "$work/driver.log"
done
keep "every protocol finished"
DRV
    chmod +x "$work/driver.sh"
    (setsid nohup "$work/driver.sh" >> "$work/driver.log" 2>&1 &)
    echo "started at $commit; logs in $work/*.log";;
  commit) commit=$(pinned) || exit 1; echo "$commit";;  # what start runs at
  status) pgrep -af "steppo.cli compare" || echo "not running"; tail -n 3 "$work"/*.log 2>/dev/null || true;;
  pause) pkill -STOP -f "steppo.cli" && echo "paused $(date -u)" >> "$work/pauses.txt";;
  resume) pkill -CONT -f "steppo.cli" && echo "resumed $(date -u)" >> "$work/pauses.txt";;
  *) echo "usage: $0 start | status | pause | resume | commit" >&2; exit 2;;
esac
