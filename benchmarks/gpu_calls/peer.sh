# llama.cpp's llama-bench (a --portable build made elsewhere, carried as .peer/bin.tar.xz) and our bench on one GGUF.
# STEPS picks among "checks gguf llama ours pool" (default: gguf llama ours pool) so the work splits over calls on one
# warm machine: the GGUF and the records stay in /tmp between them. PROMPTS: our prompt lengths.
. benchmarks/gpu_calls/lib.sh
LD_LIBRARY_PATH0=$LD_LIBRARY_PATH
machine
want() { [[ " ${STEPS:-gguf llama ours pool} " == *" $1 "* ]]; }
want checks && gpu_checks
# a --portable build made elsewhere travels as one archive (the bin folder is ~100 MB, over a call's limit)
[ -f .peer/bin.tar.xz ] && [ ! -x .peer/build-cuda/bin/llama-bench ] && mkdir -p .peer/build-cuda && tar xJf .peer/bin.tar.xz -C .peer/build-cuda
CUBLAS=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null)
# the cuBLAS that loads the CUDA backend (ggml skips one that fails to load without a word): say why not
# this build's CUDA backend calls the driver (cuMemCreate) without naming libcuda.so.1: preload it
export LD_PRELOAD=libcuda.so.1
for LIBS in "$CUBLAS:/usr/local/cuda/lib64" "/usr/local/cuda/lib64:$CUBLAS"; do
  export LD_LIBRARY_PATH=$PWD/.peer/build-cuda/bin:$LIBS:$LD_LIBRARY_PATH0
  python3 -c "import ctypes; ctypes.CDLL('.peer/build-cuda/bin/libggml-cuda.so')" >> $L/cuda_backend.txt 2>&1 && break
done
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >> $L/cuda_backend.txt
R=/tmp/peer-out; mkdir -p $R
P="python3 benchmarks/peer_llamacpp.py --out $R"
want llama && step b0 30 bash -c "ldd .peer/build-cuda/bin/libggml-cuda.so | grep -i 'not found\|cublas\|cuda'; .peer/build-cuda/bin/llama-bench --list-devices"
want gguf && step b1 320 $P --gguf
want llama && step b2 270 $P --llama ${CONFIGS:+--configs $CONFIGS}
want ours && step b3 400 $P --ours ${PROMPTS:+--prompts $PROMPTS}
want pool && step b5 150 $P --pool
step b4 20 $P --table
cp -r $R $L/peer
finish
cat $L/cuda_backend.txt $L/b0.log 2>/dev/null; tail -n 40 $L/b4.log
