#!/usr/bin/env bash
# Build a separate venv with verl beside StepPO and run the verl-plugin equivalence test there.
#
#   bash scripts/verl_venv.sh [VENV_DIR]        # default .venv-verl; ~1.9 GB
#
# verl 0.9.1 caps transformers below 5.11, so it cannot share StepPO's main venv (transformers 5.24).
# The plugin (steppo/integrations/verl.py) needs only torch and verl; the test checks that verl's
# registries hold the estimator and the loss, and that verl's own compute_advantage and policy-loss
# lookup give StepPO's numbers.
set -euo pipefail
venv=${1:-.venv-verl}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -c constraints.txt "verl==0.9.1" "transformers<5.11" cachetools uvicorn fastapi \
      pytest hypothesis pyyaml rich
  "$venv/bin/pip" install -q -c constraints.txt --no-deps -e .
fi
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/integrations/test_verl.py -rs
