#!/usr/bin/env bash
# The CUDA checks, in three parts, for a lent GPU machine that cannot download anything.
#
# Preparing (here, once; both folders are listed in .git/info/exclude and carried with the call):
#   .whl/  wheels the GPU image lacks, for cp312 manylinux x86_64 (`pip download --no-deps`): trl,
#          bitsandbytes (only libbitsandbytes_cuda130.so kept: `zip -d` the others, to fit 64 MB),
#          transformers, peft, datasets, dill, multiprocess, gguf, pydantic, pydantic-core,
#          annotated-types, typing-inspection, typing-extensions, at the versions of this venv.
#   .gpu/model/  config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja and
#          generation_config.json of the converted default model ($TUNEKIT_HOME/models/...).
#   .gpu/data/   banking77/train.csv and llamafactory-demo/alpaca_en_demo.json from ../shared/data.
# The call: `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site bench/on_gpu.sh .gpu/model .gpu/data $OUT PART`, carrying .whl and .gpu.
#
# Run as: bench/on_gpu.sh MODEL_DIR DATA_DIR OUT_DIR tests|lora|full
#   MODEL_DIR  config.json + tokenizer files of the default model (SmolLM2-135M-Instruct); the weights
#              are drawn at random from that config (seeded), since the GGUF is too large to carry to
#              such a machine. Speed and memory depend on the shapes only; losses are not comparable
#              with the pre-trained model's.
#   DATA_DIR   a folder with banking77/train.csv and llamafactory-demo/alpaca_en_demo.json
#   OUT_DIR    where the logs and JSON figures go
#   tests      the training tests on CUDA (about 4 minutes on an H100 machine), then train.compile's
#   lora       tunekit (also with train.compile) against TRL with LoRA on banking77 and alpaca (about
#              9 minutes: each run is a fresh process, about 40 s of it start-up)
#   full       full fine-tuning against TRL, then bench/methods_memory.py (about 7 minutes)
#   Each part fits one 10-minute call of the device tool; a session's 30 minutes hold all three.
#
# What it runs: the training tests on CUDA (tiny models; bf16 autocast, QLoRA with bitsandbytes' CUDA
# kernels), then bench/train_throughput.py (tunekit against TRL, LoRA and full) and
# bench/methods_memory.py (full, LoRA, DoRA, QLoRA) on the GPU.
set -uo pipefail
MODEL_DIR=$1 DATA_DIR=$2 OUT=$3 PART=${4:-}
case "$PART" in tests | lora | full) ;; *) echo "on_gpu.sh: the 4th argument must be tests, lora or full" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TUNEKIT_HOME=/tmp/tunekit-home
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, trl, bitsandbytes as b; print('torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bnb', b.__version__)" \
  | tee -a "$OUT/gpu.txt"

# The model: the default model's architecture with seeded random weights, saved where tunekit caches
# the converted default model, so the alias and the tests' fixtures find it.
RANDOM_MODEL=$TUNEKIT_HOME/models/smollm2-135m-instruct
python3 - "$MODEL_DIR" "$RANDOM_MODEL" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
print("random-weight model:", dst, sum(p.numel() for p in model.parameters()), "parameters")
EOF

if [ "$PART" = tests ]; then
# 1. Training tests on CUDA (tiny random models built in-process; the default model is not here).
timeout 420 python3 -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_train.py tests/test_methods.py tests/test_device.py tests/test_dpo.py tests/test_reward.py \
  tests/test_classify.py tests/test_resume.py tests/test_generate.py 2>&1 | tee "$OUT/pytest.txt" | tail -25
# train.compile on CUDA (inductor's triton kernels); marked slow on the CPU, so run on its own.
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_compile.py 2>&1 | tee "$OUT/pytest_compile.txt" | tail -8
exit 0
fi

# 2. Throughput against TRL on the GPU (bf16 autocast), LoRA and full fine-tuning.
TP="python3 bench/train_throughput.py --model $RANDOM_MODEL --data-dir $DATA_DIR --steps 30"
if [ "$PART" = lora ]; then
timeout 300 $TP --data banking77 --runs tunekit,tunekit_compile,trl_default,trl_best --json "$OUT/tp_banking77.json" \
  2>&1 | tee "$OUT/tp_banking77.txt" | grep -v Warning | tail -14
timeout 200 $TP --data alpaca --batch-size 4 --examples 200 --runs tunekit,trl_default,trl_best \
  --json "$OUT/tp_alpaca.json" 2>&1 | tee "$OUT/tp_alpaca.txt" | grep -v Warning | tail -12
exit 0
fi
timeout 200 $TP --data banking77 --full --runs tunekit,trl_default,trl_best --json "$OUT/tp_full.json" \
  2>&1 | tee "$OUT/tp_full.txt" | grep -v Warning | tail -12

# 3. Methods: memory and speed of full, LoRA, DoRA and QLoRA (bitsandbytes NF4 on CUDA).
timeout 240 python3 bench/methods_memory.py --model $RANDOM_MODEL --steps 10 --json "$OUT/methods.json" \
  2>&1 | tee "$OUT/methods.txt" | tail -8
