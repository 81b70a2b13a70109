# Palisade: the two commands a user runs are `make demo` and `make test`.
# Both install what they need first (on Debian 12, as root).

CARGO ?= cargo
PALISADE := target/release/palisade
STARWARS := examples/starwars

.PHONY: demo test deps build lint unit datapath-test fixtures bench bench-datapath fuzz clean

deps:
	@./scripts/install-deps.sh

build: deps
	$(CARGO) build --release --locked --bin palisade

# The Star Wars demo: first offline (the policy engine alone), then live (pods in network
# namespaces, the eBPF datapath enforcing on their veths, real requests; under the L3/L4
# policy, the flows the datapath reported: which rule let each request in, why each drop).
demo: build
	@for step in 1-no-policy 2-l3-l4 3-l7; do \
		echo; echo "== Star Wars, $$step, simulated =="; \
		$(PALISADE) simulate -f $(STARWARS)/cluster.yaml -f $(STARWARS)/$$step || exit $$?; \
	done
	@echo; echo "== What the deathstar's ingress table holds under the L7 policy =="
	@$(PALISADE) policy get -f $(STARWARS)/cluster.yaml -f $(STARWARS)/3-l7 --endpoint default/deathstar-1
	@echo; echo "== Why the xwing is dropped =="
	@$(PALISADE) policy explain -f $(STARWARS)/cluster.yaml -f $(STARWARS)/3-l7 \
		--from default/xwing --to default/deathstar-1 --port 80/TCP || [ $$? -eq 1 ]
	@echo; echo "== Star Wars, 1-no-policy, live: lab pods, eBPF datapath, real requests =="
	@$(PALISADE) lab run -f $(STARWARS)/cluster.yaml -f $(STARWARS)/1-no-policy
	@echo; echo "== Star Wars, 2-l3-l4, live: lab pods, the L3/L4 policy in the eBPF datapath," \
		"landing requests, then the flows the datapath saw =="
	@$(PALISADE) lab run --flows -f $(STARWARS)/cluster.yaml -f $(STARWARS)/2-l3-l4

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# Includes the privileged eBPF datapath tests (crates/datapath/tests/privileged.rs: packets
# through BPF_PROG_TEST_RUN, TCX attach on veths in private network namespaces; kernel >= 6.6).
# They need root and fail without it; PALISADE_SKIP_PRIVILEGED=1 skips them explicitly.
unit: deps
	$(CARGO) test --locked --workspace

# Just the datapath: ABI layout against bpf/lib/abi.h, table flattening, privileged tests.
datapath-test: deps
	$(CARGO) test --locked -p palisade-abi -p palisade-bpf -p palisade-datapath

test: lint unit

bench: deps
	$(CARGO) bench --locked -p palisade-policy --bench engine

# The datapath benchmark (root): two lab pods, iperf3 with no program / Palisade / nftables,
# the programs' per-packet cost, apply-to-enforced latency. Installs its own extras (iperf3,
# nftables: bench/install-deps.sh). Figures in docs/performance.md.
bench-datapath:
	CARGO=$(CARGO) ./bench/datapath.sh

clean:
	$(CARGO) clean

# Fuzzes the manifest parser (load_str, then cluster::load) for FUZZ_SECONDS; see docs/fuzzing.md.
# Uses the nightly toolchain when rustup has one, else stable with RUSTC_BOOTSTRAP=1. New inputs
# go to fuzz/target/corpus (not committed); fuzz/corpus/manifest holds the committed seeds.
FUZZ_SECONDS ?= 300
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@mkdir -p fuzz/target/corpus/manifest
	if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then tc=+nightly; \
		else tc=; export RUSTC_BOOTSTRAP=1; fi; \
		$(CARGO) $$tc fuzz run --fuzz-dir fuzz manifest fuzz/target/corpus/manifest fuzz/corpus/manifest \
			-- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048
