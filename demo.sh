#!/usr/bin/env bash
# Offline demo: install, build a tiny tokenizer + GPT-2 and synthetic persona dialogs, train, evaluate, print metrics.
# Needs no Hugging Face Hub access; about 2 minutes on 2 idle CPU cores once the packages are installed (README).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
# The CPU build of torch first: a bare `torch` requirement can pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python persona_synthetic.py --output_dir demo_assets
python run_persona.py configs/demo.yaml "$@"
echo
echo "Metrics: demo_assets/run/all_results.json"
cat demo_assets/run/all_results.json
