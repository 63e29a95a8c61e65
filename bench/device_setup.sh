# Sourced first in every command on the device machine:  . bench/device_setup.sh
# Unpacks the carried site-packages once (.gpusite/site.tar.xz: Ray, diffusers and the rest that the
# GPU image lacks, packed here by bench/pack_site.sh),
# sets the environment the benches expect, and builds the SD-1.5-sized model folder once.
# Files under /tmp stay while the machine stays warm, so later calls skip the slow parts.
if [ ! -f /tmp/site/.unpacked ]; then
  mkdir -p /tmp/site && tar xJf .gpusite/site.tar.xz -C /tmp/site && touch /tmp/site/.unpacked || return 1
fi
export PYTHONPATH=src:bench:/tmp/site PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
# NVLink multicast stays off on these machines (raybooth hands these to its Ray workers too)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -d /tmp/sd15 ]; then
  python3 bench/sd15.py /tmp/sd15 >/dev/null || return 1
  # bytecode compiled once, as an installed package has it (the image's and the wheels' have none)
  python3 -m compileall -q -j 16 /tmp/site src \
    "$(python3 -c 'import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))')" >/dev/null
fi
echo "device set up: $(nvidia-smi -L | wc -l) GPUs, $(python3 -c 'import torch,ray,diffusers;print(torch.__version__,ray.__version__,diffusers.__version__)')"
