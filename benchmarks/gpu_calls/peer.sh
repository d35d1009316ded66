# llama.cpp's llama-bench (a --portable build made elsewhere, carried as .peer/bin.tar.xz) and our bench on one GGUF.
. benchmarks/gpu_calls/lib.sh
machine
# a --portable build made elsewhere travels as one archive (the bin folder is ~100 MB, over a call's limit)
[ -f .peer/bin.tar.xz ] && mkdir -p .peer/build-cuda && tar xJf .peer/bin.tar.xz -C .peer/build-cuda
CUBLAS=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH=$PWD/.peer/build-cuda/bin:/usr/local/cuda/lib64:$CUBLAS:$LD_LIBRARY_PATH
P="python3 benchmarks/peer_llamacpp.py --out $L/peer"
step b0 30 bash -c "ldd .peer/build-cuda/bin/libggml-cuda.so | grep -i 'not found\|cublas\|cuda'; .peer/build-cuda/bin/llama-bench --list-devices"
step b1 150 $P --gguf
step b2 270 $P --llama
step b3 240 $P --ours --table
finish
cat $L/b0.log; tail -n 40 $L/b3.log
