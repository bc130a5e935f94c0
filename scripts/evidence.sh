#!/usr/bin/env bash
# The pre-registered protocols (issue 16), in the background, in order: compass, smollm2-searchqa,
# compass-long. They run from a clone at one commit (the commit the kept runs ran at, else HEAD)
# and keep each finished run's records in THIS checkout's results/<protocol>/runs/, which are
# committed every 10 minutes, so a later session on a fresh machine resumes from the repository.
# The protocols are read at that commit too: they are pre-registered, a later edit does not reach
# runs already under way. Every run uses one torch thread on every machine.
#
# Behaviour cloning is not bitwise reproducible across CPUs, so on a new machine a warm start
# rebuilt for a seed may differ from the one its kept runs started from. So: before each start the
# kept records are tidied with this checkout's steppo.compare.tidy_kept (each seed's starting row
# from its kept runs, so a finished seed needs no warm start; a fingerprint no kept run depends on
# dropped), and when a protocol stops on a seed's warm start, the driver builds that warm start
# again once (a torn copy on this machine), then, if it still differs, starts the seed over
# (restart-seed: its kept runs removed in a commit that says why; they stay in the history).
# What a new machine cannot rebuild, it restores: `keep-warm-starts` (run it before a session ends,
# while the runs are under way) commits the warm starts of the seeds that are part kept, part under
# way, to results/<p>/warm_starts/ (a few MB each: only those seeds, so the history stays small),
# and start puts them back where compare looks for them, so those seeds' kept runs stand.
# A protocol whose compare exits 0 (every run kept, nothing left to train) gets results/<p>/FINISHED
# and is not compared again, so its report, regenerated at HEAD, is not rewritten at the old commit.
#
#   scripts/evidence.sh start         run the protocols in the background (a driver, `drive`)
#   scripts/evidence.sh keep-warm-starts   commit the warm starts a new machine could not rebuild
#   scripts/evidence.sh restore-warm-starts   put them back into the scratch runs (what start does)
#   scripts/evidence.sh status | pause | resume
#   scripts/evidence.sh commit        the commit a start would run at
#   scripts/evidence.sh tidy          what start does to the kept records (nothing may be running)
#   scripts/evidence.sh restart-seed P K        seed K of protocol P starts over
#   scripts/evidence.sh mismatched-seed LOG [BYTES]   the seed a compare log (after BYTES) stopped on
set -euo pipefail
repo=${EVIDENCE_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
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

running() { pgrep -f "steppo.cli compare .*--out $repo/results/" > /dev/null; }  # this checkout's

checkout_python() {  # python (stdin) with this checkout's steppo, from its root (no other steppo first)
  (cd "$repo" && PYTHONPATH="$repo" "$work/.venv/bin/python" - "$@")
}

tidy() {  # $1 = drop (at start, nothing running) or rows (while runs are under way)
  checkout_python "$repo" "$1" "${protocols[@]}" <<'PY'
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

warm() {  # $1 = keep (scratch -> results/<p>/warm_starts/) or restore (the other way); this checkout's steppo
  checkout_python "$repo" "$work" "$1" "${protocols[@]}" <<'PY'
import shutil
import sys
from pathlib import Path

from steppo.compare import keep_warm_starts, restore_warm_starts

repo, work, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
for name in sys.argv[4:]:
    results, scratch = repo / "results" / name, work / "runs" / "compare" / name
    if (results / "FINISHED").exists():  # every run kept: no warm start is needed again
        shutil.rmtree(results / "warm_starts", ignore_errors=True)
    elif what == "keep":
        print(f"{name}: warm starts of seeds {keep_warm_starts(results / 'runs', scratch, results / 'warm_starts')} stored")
    else:
        print(f"{name}: warm starts of seeds {restore_warm_starts(results / 'runs', results / 'warm_starts', scratch)} restored")
PY
}

keep() {  # commit results/ when it changed (one git writer at a time); say so when a commit fails
  local why=$1
  (
    flock 9
    git -C "$repo" add -A results/ &&
      { git -C "$repo" diff --cached --quiet -- results/ || git -C "$repo" commit -q -m "evidence: $why" -- results/; }
  ) 9> "$repo/.git/evidence.lock" || echo "$(date -u) commit failed: $why (next try in 10 min)" >&2
}

mismatched_seed() {  # the seed whose warm start stopped the compare that wrote LOG after byte BYTES
  tail -c +$(( ${2:-0} + 1 )) "$1" | sed -n 's/.*the warm start of seed \([0-9][0-9]*\) .* is not the one.*/\1/p' | tail -n 1
}

restart_seed() {  # P K: seed K's kept runs, fingerprint and starting row go, in a commit that says why
  local p=$1 k=$2 kept="$repo/results/$1/runs" dirs
  [[ "$k" =~ ^[0-9]+$ ]] && [ -d "$kept" ] || { echo "restart-seed: no kept records of protocol '$p' seed '$k'" >&2; return 2; }
  keep "kept run records (before $p seed $k starts over)"  # every kept run is in the history first
  shopt -s nullglob
  dirs=("$kept"/*/"seed$k")
  shopt -u nullglob
  rm -rf "${dirs[@]}" "$kept/sft/seed$k.json" "$kept/zero_shot/seed$k.json" "$repo/results/$p/warm_starts/seed$k"
  keep "$p seed $k starts over (${#dirs[@]} kept runs removed, in the history): its warm start, rebuilt on this machine, is not the one they started from (behaviour cloning is not bitwise reproducible across CPUs), so new runs could not be paired with them"
  echo "$(date -u) $p seed $k starts over: ${#dirs[@]} kept runs removed (its warm start could not be rebuilt here)"
}

drive() {  # the protocols in order, committing every 10 minutes (what start runs in the background)
  cd "$work"
  ( trap 'kill $nap 2>/dev/null; exit 0' TERM  # (its sleep goes with it)
    while true; do
      sleep 600 & nap=$!
      wait $nap
      tidy rows || echo "$(date -u) tidy failed (above)"
      keep "kept run records ($(ls "$repo"/results/*/runs/*/seed*/done.json 2>/dev/null | wc -l) runs)"
    done ) &
  loop=$!  # (global: the trap reads it at exit)
  trap 'kill $loop 2>/dev/null' EXIT
  local p attempt size seed rebuilt rc
  for p in "${protocols[@]}"; do
    # a finished protocol is not compared again: that would rewrite its report with the pinned
    # commit's report writer over the one regenerated at HEAD
    [ -e "$repo/results/$p/FINISHED" ] && continue
    rebuilt=""
    for attempt in 1 2 3 4 5; do
      size=$(stat -c %s "$work/$p.log" 2>/dev/null || echo 0)
      rc=0
      .venv/bin/python -m steppo.cli compare "configs/compare/$p.yaml" --jobs 2 --threads 1 \
        --out "$repo/results/$p" >> "$work/$p.log" 2>&1 || rc=$?
      if [ "$rc" = 0 ]; then
        mkdir -p "$repo/results/$p"
        echo "every run kept at $(pinned), $(date -u +%FT%TZ); scripts/evidence.sh compares it no more" \
          > "$repo/results/$p/FINISHED"
        break
      fi
      seed=$(mismatched_seed "$work/$p.log" "$size")
      echo "$(date -u) $p failed ($rc)${seed:+ on the warm start of seed $seed}"
      [ -n "$seed" ] || break
      if [[ " $rebuilt " != *" $seed "* ]]; then  # first, build it again here (a torn copy?)
        rebuilt="$rebuilt $seed"
        rm -rf "$work/runs/compare/$p/sft/seed$seed"
      else
        restart_seed "$p" "$seed" || break
      fi
    done
  done
  tidy rows || true
  keep "every protocol finished"
}

case "${1:-status}" in
  start)
    if running; then echo "already running (scripts/evidence.sh status)" >&2; exit 1; fi
    commit=$(pinned) || exit 1
    if [ ! -d "$work/.git" ]; then git clone -q "$repo" "$work"; fi
    git -C "$work" fetch -q "$repo" && git -C "$work" checkout -q "$commit"
    (cd "$work" && python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e ".[envs,models,plots]")
    tidy drop || { echo "tidying the kept records failed (above): fix them, then start again" >&2; exit 1; }
    warm restore || { echo "restoring the stored warm starts failed (above)" >&2; exit 1; }
    cp "$0" "$work/evidence-driver.sh"  # the driver runs from a copy: editing this file cannot disturb it
    (EVIDENCE_REPO="$repo" EVIDENCE_DIR="$work" setsid nohup bash "$work/evidence-driver.sh" drive \
      >> "$work/driver.log" 2>&1 &)
    echo "started at $commit; logs in $work/*.log";;
  drive) drive;;
  restore-warm-starts) warm restore;;
  keep-warm-starts)  # (under the git lock: the 10-minute commit must not take a copy half made)
    ( flock 9; warm keep ) 9> "$repo/.git/evidence.lock"
    keep "warm starts of the seeds under way (a new machine restores them)";;
  commit) commit=$(pinned) || exit 1; echo "$commit";;
  tidy) if running; then echo "runs are under way: tidying now could drop a fingerprint they need" >&2; exit 1; fi
        tidy drop;;
  restart-seed)
    if running; then echo "runs are under way: a seed starts over only while nothing runs" >&2; exit 1; fi
    restart_seed "${2:?protocol}" "${3:?seed}";;
  mismatched-seed) mismatched_seed "${2:?log}" "${3:-0}";;
  status) pgrep -af "steppo.cli compare .*--out $repo/results/" || echo "not running"; tail -n 3 "$work"/*.log 2>/dev/null || true;;
  pause) pkill -STOP -f "steppo.cli" && echo "paused $(date -u)" >> "$work/pauses.txt";;
  resume) pkill -CONT -f "steppo.cli" && echo "resumed $(date -u)" >> "$work/pauses.txt";;
  *) echo "usage: $0 start | status | pause | resume | commit | tidy | keep-warm-starts | restore-warm-starts | restart-seed P K | mismatched-seed LOG [BYTES]" >&2
     exit 2;;
esac
