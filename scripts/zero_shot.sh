#!/usr/bin/env bash
# Zero-shot rows: the untrained SmolLM2-135M-Instruct (ReAct-style prompting, greedy) on every
# environment's held-out split. Writes results/zero_shot/<env>_<split>.json.
#   EPISODES=20 bash scripts/zero_shot.sh        # episodes per split (default 20); CPU: ~2 min per 10
set -euo pipefail
n=${EPISODES:-20}
out=results/zero_shot
mkdir -p "$out"
model=(model.name=smollm2-135m run.output_dir=runs/zero_shot run.progress=false)
common=("${model[@]}" env.react=true)
steppo eval "${common[@]}" env=compass --split dev --episodes "$n" --json "$out/compass_dev.json"
steppo eval "${common[@]}" env=twx "env.params={game: coin, game_params: {numLocations: 3}}" \
    rollout.context=window --split dev --episodes "$n" --json "$out/twx_coin_dev.json"
steppo eval "${common[@]}" env=textworld "env.params={challenge: tw-coin_collector, challenge_settings: {level: 5}}" \
    rollout.context=window --split dev --episodes "$n" --json "$out/textworld_coin_dev.json"
for split in valid_seen valid_unseen; do
  steppo eval "${common[@]}" env=alfworld rollout.context=env rollout.env_workers=process rollout.num_envs=4 \
      --split $split --episodes "$n" --json "$out/alfworld_$split.json"
done
steppo eval "${common[@]}" env=searchqa "env.params={source: hotpotqa}" --split dev --episodes "$n" \
    --json "$out/searchqa_hotpotqa_dev.json"
steppo eval "${common[@]}" env=searchqa "env.params={source: musique}" --split test --episodes "$n" \
    --json "$out/searchqa_musique_test.json"
# the smollm2-searchqa protocol's environment, with its plain tool-call prompt (no ReAct)
steppo eval "${model[@]}" env=searchqa \
    "env.params={source: synthetic, hops: 1, num_tasks: {train: 1000, dev: 40, test: 100}}" \
    rollout.max_new_tokens=48 --split dev --episodes 40 --json "$out/searchqa_synthetic_1hop_dev.json"
