#!/usr/bin/env bash
# The pre-registered protocols (issue 16), in the background, in order: compass, smollm2-searchqa,
# compass-long. They run from a clone at one commit (the commit the kept runs ran at, else HEAD)
# and keep each finished run's records in THIS checkout's results/<protocol>/runs/, which are
# committed every 10 minutes, so a later session on a fresh machine resumes from the repository.
# The protocols are read at that commit too: they are pre-registered, a later edit does not reach
# runs already under way. Every run uses one torch thread on every machine, so a warm start rebuilt
# on another machine can match the fingerprint its seed's kept runs started from.
# Behaviour cloning is not bitwise reproducible across CPUs, so on a new machine a warm start
# rebuilt for a seed may differ from the one its kept runs started from: before each start the kept
# records are tidied with this checkout's steppo.compare.tidy_kept (each seed's starting row from its
# kept runs, so a finished seed needs no warm start; a fingerprint no kept run depends on dropped),
# and a seed whose kept runs started from a lost warm start stops its protocol with the fix.
#   scripts/evidence.sh start | status | pause | resume | commit (the commit a start would run at)
#                     | tidy (what start does to the kept records; needs the evidence venv)
#                     | restart-seed P K (what the driver does when a protocol stops on seed K's warm start)
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

tidy() {  # $1 = drop (at start, nothing running) or rows (while runs are under way)
  PYTHONPATH="$repo" "$work/.venv/bin/python" - "$repo" "$1" "${protocols[@]}" <<'PY'
import sys
from pathlib import Path

from steppo.compare import tidy_kept

repo, drop = Path(sys.argv[1]), sys.argv[2] == "drop"
for name in sys.argv[3:]:
    kept = repo / "results" / name / "runs"
    if kept.is_dir():
        print(f"{name}: starting rows of seeds {sorted(tidy_kept(kept, drop_unused_fingerprints=drop))}")
PY
}

case "${1:-status}" in
  start)
    if pgrep -f "steppo.cli compare" > /dev/null; then echo "already running (scripts/evidence.sh status)" >&2; exit 1; fi
    commit=$(pinned) || exit 1
    if [ ! -d "$work/.git" ]; then git clone -q "$repo" "$work"; fi
    git -C "$work" fetch -q "$repo" && git -C "$work" checkout -q "$commit"
    (cd "$work" && python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e ".[envs,models]")
    tidy drop || { echo "tidying the kept records failed (above): fix them, then start again" >&2; exit 1; }
    cat > "$work/driver.sh" <<DRV
#!/usr/bin/env bash
cd "$work"
keep() {  # commit results/ in the main checkout when it changed; say so when a commit fails
  bash "$repo/scripts/evidence.sh" tidy-rows >> "$work/driver.log" 2>&1 || echo "\$(date -u) tidy failed (above)" >> "$work/driver.log"
  git -C "$repo" add results/ && { git -C "$repo" diff --cached --quiet -- results/ ||
    git -C "$repo" commit -q -m "evidence: \$1" -- results/ ||
    echo "\$(date -u) commit failed (next try in 10 min)" >> "$work/driver.log"; }
}
( while sleep 600; do keep "kept run records (\$(ls $repo/results/*/runs/*/seed*/done.json 2>/dev/null | wc -l) runs)"; done ) &
loop=\$!
trap 'kill \$loop 2>/dev/null' EXIT
for p in ${protocols[*]}; do
  for attempt in 1 2 3 4; do  # a seed whose warm start cannot be rebuilt here is started over, then again
    .venv/bin/python -m steppo.cli compare configs/compare/\$p.yaml --jobs 2 --threads 1 --out "$repo/results/\$p" >> "$work/\$p.log" 2>&1 && break
    echo "\$(date -u) \$p failed" >> "$work/driver.log"
    seed=\$(tail -n 3 "$work/\$p.log" | sed -n 's/.*the warm start of seed \\([0-9][0-9]*\\) .* is not the one.*/\\1/p' | tail -n 1)
    [ -n "\$seed" ] && bash "$repo/scripts/evidence.sh" restart-seed "\$p" "\$seed" >> "$work/driver.log" 2>&1 || break
  done
done
keep "every protocol finished"
DRV
    chmod +x "$work/driver.sh"
    (setsid nohup "$work/driver.sh" >> "$work/driver.log" 2>&1 &)
    echo "started at $commit; logs in $work/*.log";;
  commit) commit=$(pinned) || exit 1; echo "$commit";;  # what start runs at
  tidy) if pgrep -f "steppo.cli compare" > /dev/null; then echo "runs are under way: only tidy-rows is safe now" >&2; exit 1; fi
        tidy drop;;
  tidy-rows) tidy rows;;  # the driver's, every 10 minutes
  restart-seed)  # P K: seed K of protocol P starts over (the driver's, when its warm start cannot be rebuilt here)
    p=${2:?protocol}; k=${3:?seed}; kept="$repo/results/$p/runs"
    [[ "$k" =~ ^[0-9]+$ ]] && [ -d "$kept" ] || { echo "restart-seed: no kept records of protocol '$p' seed '$k'" >&2; exit 2; }
    gone=$(ls -d "$kept"/*/"seed$k" 2>/dev/null | wc -l)
    rm -rf "$kept"/*/"seed$k" "$kept/sft/seed$k.json" "$kept/zero_shot/seed$k.json"
    git -C "$repo" add -A "results/$p/runs" && git -C "$repo" commit -q -m "evidence: $p seed $k starts over ($gone kept runs removed, in the history): its warm start, rebuilt on this machine, is not the one they started from (behaviour cloning is not bitwise reproducible across CPUs), so new runs could not be paired with them" -- "results/$p/runs"
    echo "$(date -u) $p seed $k starts over: $gone kept runs removed (its warm start could not be rebuilt here)";;
  status) pgrep -af "steppo.cli compare" || echo "not running"; tail -n 3 "$work"/*.log 2>/dev/null || true;;
  pause) pkill -STOP -f "steppo.cli" && echo "paused $(date -u)" >> "$work/pauses.txt";;
  resume) pkill -CONT -f "steppo.cli" && echo "resumed $(date -u)" >> "$work/pauses.txt";;
  *) echo "usage: $0 start | status | pause | resume | commit | tidy" >&2; exit 2;;
esac
