#!/usr/bin/env bash
# Build a separate venv with verl beside StepPO and run the verl-plugin equivalence test there.
#
#   bash scripts/verl_venv.sh [VENV_DIR]        # default .venv-verl; ~1.9 GB
#
# verl 0.9.1 caps transformers below 5.11, so it cannot share StepPO's main venv (transformers 5.24).
# The plugin (steppo/integrations/verl.py) needs only torch and verl (TransferQueue for verl's
# default v1 trainer); the test checks, by hand-computed cases, rewards on tool tokens, truncation
# bootstrap, the step critic, the log-ratio clamp and clip_frac; that importing the plugin the way
# verl's workers do (external_lib -> import_external_libs, in a fresh process) registers it; and
# that verl's own compute_advantage, policy-loss lookup and value_loss give StepPO's numbers.
set -euo pipefail
venv=${1:-.venv-verl}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -c constraints.txt "verl==0.9.1" "transformers<5.11" "TransferQueue>=0.1.10" cachetools uvicorn \
      fastapi pytest hypothesis pyyaml rich
  "$venv/bin/pip" install -q -c constraints.txt --no-deps -e .
fi
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/integrations/test_verl.py -rs
