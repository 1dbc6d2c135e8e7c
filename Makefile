# pmp — build, test and benchmark. `make deps` installs what the build needs on Debian 12.
CC       ?= cc
CFLAGS   ?= -O2 -g
# BLIS built on OpenMP (core/cpu/blas/blas.h), so BLAS and our kernels share one thread pool instead of two
# pools spinning against each other; rpath pins that variant whatever Debian's alternatives point to.
MULTIARCH := $(shell $(CC) -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
BLAS_DIR := /usr/lib/$(MULTIARCH)/blis-openmp
CFLAGS   += -std=c11 -Wall -Wextra -fopenmp -fPIC -fno-semantic-interposition -D_GNU_SOURCE -Icore \
            -isystem /usr/include/$(MULTIARCH)/blis-openmp $(shell pkg-config --cflags luajit libpcre2-8 libutf8proc ompi-c 2>/dev/null)
LDLIBS   += $(shell pkg-config --libs luajit libpcre2-8 libutf8proc ompi-c 2>/dev/null) -lpthread -ldnnl -L$(BLAS_DIR) -Wl,-rpath,$(BLAS_DIR) -lblis \
            -lreadline -lmvec -lm -ldl -fopenmp
# Export every engine symbol so the FFI can find them through ffi.C.
LDFLAGS  += -rdynamic
# `make sanitize` builds the same sources with these into their own folder and executable.
SANITIZE_FLAGS ?=
CFLAGS   += $(SANITIZE_FLAGS)
LDFLAGS  += $(SANITIZE_FLAGS)
BUILD    ?= build
EXE      ?= pmp

# The engine is every .c under core/ by subsystem folder, except the executable's host.
CORE_SRCS := $(sort $(shell find core -name '*.c' -not -path 'core/host/*'))
HOST_SRCS := $(wildcard core/host/*.c)
HEADERS   := $(shell find core -name '*.h')
CORE_OBJS := $(CORE_SRCS:%.c=$(BUILD)/%.o)
HOST_OBJS := $(HOST_SRCS:%.c=$(BUILD)/%.o)

DEBIAN_PACKAGES := build-essential pkg-config luajit libluajit-5.1-dev libreadline-dev \
                   libblis-openmp-dev libdnnl-dev libpcre2-dev libutf8proc-dev lua-busted tmux \
                   libopenmpi-dev openmpi-bin

.PHONY: all cuda deps test test-reference mutate sanitize soak fuzz print-ldlibs print-cflags bench bench-tokenizer bench-generate bench-batch-generate bench-pretrain bench-dist bench-moe clean
all: $(EXE)

$(EXE): $(HOST_OBJS) $(BUILD)/libpmpcore.a
	$(CC) $(LDFLAGS) -o $@ $(HOST_OBJS) -Wl,--whole-archive $(BUILD)/libpmpcore.a -Wl,--no-whole-archive $(LDLIBS)

$(BUILD)/libpmpcore.a: $(CORE_OBJS)
	rm -f $@ && ar rcs $@ $^

# The attention tiles are hand-blocked multiply-adds: let them fuse into FMA instructions (ISO C mode
# otherwise keeps every multiply and add separately rounded).
$(BUILD)/core/cpu/cpu_attention.o: CFLAGS += -ffp-contract=fast
# sqrtf without errno is one vector instruction; the moments are never negative, so errno never mattered
$(BUILD)/core/cpu/cpu_optim.o: CFLAGS += -fno-math-errno

$(BUILD)/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

# The GPU backend, a library loaded at run time so the pmp executable needs no CUDA.
CUDA_HOME ?= /usr/local/cuda
NVCC      ?= $(CUDA_HOME)/bin/nvcc
cuda: build/libpmp_cuda.so

build/libpmp_cuda.so: cuda/nccl.cu core/pmp.h $(wildcard core/pmp/*.h)
	@mkdir -p build
	$(NVCC) -O2 -std=c++17 -Xcompiler -fPIC,-Wall -shared -Icore -o $@ $< -L$(CUDA_HOME)/lib64 -lnccl -lcudart \
	  -Xlinker -rpath,$(CUDA_HOME)/lib64

deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	else echo "all Debian packages present"; fi

test: pmp
	./pmp spec/run.lua

# The opt-in checks against Python references (PyPI: torch transformers safetensors megatron-core tensorboard):
# run before resolving any change to how pmp reads or writes other tools' formats.
test-reference: pmp
	tools/test_reference.sh

# Plants each bug of tools/mutations.txt in a scratch copy and checks that the specs catch it (minutes).
mutate: pmp
	./pmp tools/mutate.lua

# AddressSanitizer (with LeakSanitizer) and UndefinedBehaviorSanitizer over the whole spec suite, on
# pmp-sanitize built in build/sanitize; tools/sanitize.sh sets the options and suppressions.
sanitize:
	$(MAKE) BUILD=build/sanitize EXE=pmp-sanitize SANITIZE_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer" pmp-sanitize
	tools/sanitize.sh $(SPECS)

soak: pmp
	tools/soak.sh

# libFuzzer over the parsers of outside bytes (tools/fuzz.sh; FUZZ_SECONDS per target)
FUZZ_SECONDS ?= 60
fuzz:
	tools/fuzz.sh --seconds $(FUZZ_SECONDS)

print-ldlibs:
	@echo $(LDLIBS)

print-cflags:
	@echo $(CFLAGS)

bench: pmp
	./pmp tools/bench_core.lua

# Against the Python reference implementations (pip: tokenizers, torch, transformers), in the same run.
bench-tokenizer: pmp
	./pmp tools/bench_tokenizer.lua

bench-generate: pmp
	tools/bench_generate.sh

# Offline batch generation: the continuous-batching engine against transformers' padded static batches.
bench-batch-generate: pmp
	tools/bench_batch_generate.sh

bench-pretrain: pmp
	tools/bench_pretrain.sh

# A MoE layer against the dense MLP with the same active parameters, and both against PyTorch's.
bench-moe: pmp
	./pmp tools/bench_moe.lua

# Collective traffic per layout (measured vs expected bytes) and the hidden part of DP communication (mpirun).
bench-dist: pmp
	tools/bench_dist.sh

clean:
	rm -rf build pmp pmp-sanitize
