#!/bin/bash
# The GPU-box side of the recipe sweep: generate data on its 16 cores, then run plan_gpu.py's
# configurations 14 at a time on the one GPU until the time budget is spent.  Results -> $OUT.
# usage (from a folder holding these scripts, real.npz and the captcha wheel): bash run_device.sh BUDGET_S [PLAN]
T0=$(date +%s); BUDGET=${1:-560}; PLAN=${2:-plan_gpu}
HERE=$(cd "$(dirname "$0")" && pwd); cd "$HERE"
export PYTHONUNBUFFERED=1 RECIPE_DATA=/tmp/rd
mkdir -p $RECIPE_DATA /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site captcha-*.whl && export PYTHONPATH=/tmp/site
nproc; nvidia-smi -L; python3 -c "import torch, PIL, numpy, captcha; print(torch.__version__, PIL.__version__, numpy.__version__)"
python3 gen.py test 2000 999 --workers 16 --sizes 32x80,40x100,48x128 --rgb 32x80
python3 gen.py train_a 160000 1 --workers 16 --sizes 32x80,40x100 --rgb 32x80
python3 prep_real.py real.npz
if [ "$PLAN" != plan_default ]; then  # plan_default needs train_a only
  (python3 gen.py train_b 240000 2 --workers 5 && touch $RECIPE_DATA/train_b.done) > $RECIPE_DATA/gen_b.log 2>&1 &
fi
touch $RECIPE_DATA/gen_b.log
LEFT=$(( BUDGET - ($(date +%s) - T0) - 25 ))
echo "sweep deadline ${LEFT}s"
python3 sweep.py $PLAN --workers 12 --deadline $LEFT --out $RECIPE_DATA/sweep 2>&1 | tee $RECIPE_DATA/sweep_driver.log
cat $RECIPE_DATA/gen_b.log
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
tar czf $OUT/sweep.tgz -C $RECIPE_DATA sweep sweep_driver.log gen_b.log
echo "total $(( $(date +%s) - T0 ))s"
