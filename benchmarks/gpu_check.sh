#!/usr/bin/env bash
# The GPU checks of issue 4 in one run, on a machine with an NVIDIA GPU and a CUDA build of torch:
#   1. tests/test_gpu.py (CPU and GPU give the same numbers; dask-cuda workers in full fp32) and
#      tests/test_measure.py (the streaming kernel against the direct definitions, here on cuda);
#   2. benchmarks/devices.py: one series analysed on CPU worker processes and on
#      dask-cuda GPU workers, wall times and each stored variable's largest
#      difference from the CPU store; default metrics, then --spectral;
#   3. benchmarks/throughput.py on the GPU (default params): marginal rate.
# Packages the machine lacks can come as wheels in .whl/ (installed to /tmp/site, over nothing of
# the machine's own: its torch and CUDA stay). Logs go to $OUT (or ./gpu-logs).
# Usage: bash benchmarks/gpu_check.sh [MB per checkpoint, default 1024] [checkpoints, default 8]
set -u
size=${1:-1024}
count=${2:-8}
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH" PATH="/tmp/site/bin:$PATH"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nproc
    python3 -c "import dask, dask_cuda, numpy, safetensors, torch, xarray, zarr
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| dask', dask.__version__, '| dask_cuda',
      dask_cuda.__version__, '| xarray', xarray.__version__, '| zarr', zarr.__version__, '| numpy', numpy.__version__)"
} 2>&1 | tee "$out/machine.txt"
timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_measure.py 2>&1 | tee "$out/pytest.log"
timeout 240 python3 benchmarks/devices.py --size "$size" --checkpoints "$count" --json 2>&1 \
    | tee "$out/devices.log"
timeout 150 python3 benchmarks/devices.py --size $((size / 4)) --checkpoints 4 --spectral --json 2>&1 \
    | tee "$out/devices_spectral.log"
timeout 150 python3 benchmarks/throughput.py --size "$size" --checkpoints "$count" 2>&1 \
    | tee "$out/throughput.log"
