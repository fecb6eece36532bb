set -x
nvidia-smi --query-gpu=name --format=csv
export PYTHONPATH=$PWD
python3 -m pytest -m gpu -q -x 2>&1 | tail -15 | tee $OUT/gpu_tests.log
python3 benchmarks/quant_kernels.py 2>&1 | tee $OUT/quant_kernels.log
python3 benchmarks/quant.py 2>&1 | tee $OUT/quant.log
