# pgrelay - build, test, install, demo and benchmark.
#
#   make            build bin/pgrelay
#   make deps       install every build and test dependency from Debian packages
#   make test       deps + build + unit tests + integration, fault-injection and browser tests
#                   (+ test-patroni when CI is set)
#   make test-patroni  pgrelay and HAProxy in front of etcd + three Patroni members
#   make bench      pgbench: direct vs pgrelay vs PgBouncer vs HAProxy (not part of test)
#   make bench-tls  the same with sslmode=require: PostgreSQL's TLS vs pgrelay's vs PgBouncer's
#   make bench-control  N simulated agents against one pgrelay-control (not part of test)
#   make demo       throwaway PostgreSQL + pgrelay + a short pgbench; Ctrl-C stops it
#   make install    PREFIX=/usr/local DESTDIR= (PGRELAY_GROUP=pgrelay); make uninstall undoes it
#   make SANITIZE=address test   the same suite under AddressSanitizer (separate build dir)
#   make fuzz       every libFuzzer target for FUZZ_SECONDS (default 60) each; fails on a crash

VERSION    := 0.1.0
PREFIX     ?= /usr/local
DESTDIR    ?=
BINDIR     := $(PREFIX)/bin
SBINDIR    := $(PREFIX)/sbin
MANDIR     := $(PREFIX)/share/man
SYSCONFDIR ?= /etc

CC       ?= cc
SANITIZE ?=
PYTHON   := /usr/bin/python3

ifeq ($(SANITIZE),)
BUILD    := build
BIN      := bin
else
BUILD    := build-$(SANITIZE)
BIN      := bin-$(SANITIZE)
SANFLAGS := -fsanitize=$(SANITIZE) -fno-omit-frame-pointer
ifeq ($(SANITIZE),thread)
# ThreadSanitizer does not model fences: the seqlocks of the proxy's shared memory (shm.h) use
# them, so their by-design racy reads are reported there; it is meant for the threads of
# pgrelay-control (lease, store worker) and pgrelay-agent (control plane, planner, Patroni).
SANFLAGS += -Wno-tsan
endif
endif

# Debian packages for building, testing, benchmarking.
DEB_BUILD := build-essential pkg-config libevent-dev libpq-dev libcurl4-openssl-dev \
             libinih-dev libjansson-dev libssl-dev libcmocka-dev
DEB_TEST  := postgresql-15 postgresql-client-15 python3 python3-pytest python3-psycopg socat \
             procps util-linux mount iproute2 groff-base python3-prometheus-client haproxy \
             clang nftables chromium chromium-driver python3-selenium libfaketime
DEB_BENCH := pgbouncer haproxy postgresql-contrib
DEB_PATRONI := patroni etcd-server etcd-client haproxy

PROXY_PKGS := libevent inih jansson openssl
AGENT_PKGS := libevent libpq inih libcurl jansson openssl
CONTROL_PKGS := libevent libevent_openssl libpq inih jansson openssl
CTL_PKGS   := libcurl jansson
UNIT_PKGS  := cmocka inih openssl

WARN     := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes
CFLAGS   ?= -O2 -g
ALL_CFLAGS = -std=gnu11 $(WARN) $(CFLAGS) $(SANFLAGS) -D_GNU_SOURCE \
             -DPGRELAY_VERSION='"$(VERSION)"' -Icommon -MMD -MP
LDFLAGS  ?=

COMMON_SRC := common/log.c common/daemon.c common/inifile.c common/config.c common/pgproto.c common/shm.c
PROXY_SRC  := $(wildcard proxy/*.c)
AGENT_SRC  := $(wildcard agent/*.c)
CTL_SRC    := $(wildcard ctl/*.c)
CONTROL_SRC := $(wildcard control/*.c)
UNIT_SRC   := $(wildcard tests/unit/test_*.c)

COMMON_OBJ := $(COMMON_SRC:%.c=$(BUILD)/%.o)
# OpenSSL pieces of the two binaries that link OpenSSL (the proxy and the control plane).
TLS_FILES_OBJ := $(BUILD)/common/tls_files.o
PROXY_OBJ  := $(PROXY_SRC:%.c=$(BUILD)/%.o)
AGENT_OBJ  := $(AGENT_SRC:%.c=$(BUILD)/%.o)
CTL_OBJ    := $(CTL_SRC:%.c=$(BUILD)/%.o)
CONTROL_OBJ := $(CONTROL_SRC:%.c=$(BUILD)/%.o) $(BUILD)/gen/ui_data.o
UI_FILES   := $(sort $(wildcard control/ui/*.html control/ui/*.css control/ui/*.js control/ui/*.svg))
UNIT_BINS  := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)

PGRELAY    := $(BIN)/pgrelay
AGENT      := $(BIN)/pgrelay-agent
CONTROL    := $(BIN)/pgrelay-control
CTL        := $(BIN)/pgrelayctl

.PHONY: all control deps check-deps test unit integration browser bench demo demo-stop install uninstall clean format \
        fuzz fuzz-build fuzz-regress

all: $(PGRELAY) $(AGENT) $(CONTROL) $(CTL)

check-deps:
	@pkg-config --exists libevent libpq libcurl inih jansson openssl cmocka || \
	  { echo "missing build dependencies: run 'make deps' (Debian: $(DEB_BUILD))" >&2; exit 1; }

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(shell pkg-config --cflags $(PROXY_PKGS) $(AGENT_PKGS) $(CONTROL_PKGS)) \
	  -c -o $@ $<

$(PGRELAY): $(PROXY_OBJ) $(COMMON_OBJ) $(TLS_FILES_OBJ) | check-deps
	@mkdir -p $(BIN)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $^ $(shell pkg-config --libs $(PROXY_PKGS))

$(AGENT): $(AGENT_OBJ) $(COMMON_OBJ) | check-deps
	@mkdir -p $(BIN)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -pthread -o $@ $^ $(shell pkg-config --libs $(AGENT_PKGS))

# The web UI's files as byte arrays, compiled into pgrelay-control (control/ui_assets.c).
$(BUILD)/gen/ui_data.c: $(UI_FILES) control/ui/gen_assets.sh
	@mkdir -p $(dir $@)
	sh control/ui/gen_assets.sh $@ $(UI_FILES)

$(BUILD)/gen/ui_data.o: $(BUILD)/gen/ui_data.c
	$(CC) $(ALL_CFLAGS) -Icontrol -c -o $@ $<

# The control plane alone.
control: $(CONTROL) $(CTL)

$(CONTROL): $(CONTROL_OBJ) $(COMMON_OBJ) $(TLS_FILES_OBJ) | check-deps
	@mkdir -p $(BIN)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $^ $(shell pkg-config --libs $(CONTROL_PKGS))

$(CTL): $(CTL_OBJ) | check-deps
	@mkdir -p $(BIN)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $^ $(shell pkg-config --libs $(CTL_PKGS))

# Unit tests of agent and proxy code link the object they test.
$(BUILD)/tests/test_normalize: $(BUILD)/agent/normalize.o
$(BUILD)/tests/test_utf8: $(BUILD)/proxy/utf8.o
$(BUILD)/tests/test_tls_sasl: $(BUILD)/proxy/tls.o $(TLS_FILES_OBJ)

$(BUILD)/tests/%: tests/unit/%.c $(COMMON_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(shell pkg-config --cflags $(UNIT_PKGS)) -pthread -o $@ \
	  $(filter %.c %.o,$^) $(shell pkg-config --libs $(UNIT_PKGS))

# Installs only what is missing; silent and quick when everything is there.
deps:
	@missing=""; for p in $(DEB_BUILD) $(DEB_TEST); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

deps-bench: deps
	@missing=""; for p in $(DEB_BENCH); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; $$t; done

# Under a sanitizer every process writes its reports to files in SANITIZER_DIR, and the test
# during which a report appeared fails with it (conftest.py), so none goes unnoticed in a log.
ifneq ($(SANITIZE),)
SANITIZER_DIR := $(abspath $(BUILD))/sanitizer-reports
SANITIZER_ENV := PGRELAY_SANITIZER_DIR=$(SANITIZER_DIR) \
                 ASAN_OPTIONS=log_path=$(SANITIZER_DIR)/report \
                 UBSAN_OPTIONS=log_path=$(SANITIZER_DIR)/report:print_stacktrace=1 \
                 TSAN_OPTIONS=log_path=$(SANITIZER_DIR)/report
endif

integration: $(PGRELAY) $(AGENT) $(CONTROL) $(CTL)
	$(if $(SANITIZER_DIR),rm -rf $(SANITIZER_DIR) && mkdir -p $(SANITIZER_DIR))
	$(SANITIZER_ENV) PGRELAY_BIN=$(abspath $(PGRELAY)) PGRELAY_CONTROL_BIN=$(abspath $(CONTROL)) \
	PGRELAYCTL_BIN=$(abspath $(CTL)) $(PYTHON) -m pytest -v -p no:cacheprovider tests/integration
	$(SANITIZER_ENV) PGRELAY_BIN=$(abspath $(PGRELAY)) PGRELAY_CONTROL_BIN=$(abspath $(CONTROL)) \
	PGRELAYCTL_BIN=$(abspath $(CTL)) $(PYTHON) -m pytest -v -p no:cacheprovider tests/faults

# The web UI in headless Chromium (Selenium), against a real control plane and two proxies;
# screenshots of every page land in build/test-artifacts/browser.
browser: $(PGRELAY) $(AGENT) $(CONTROL) $(CTL)
	$(SANITIZER_ENV) PGRELAY_BIN=$(abspath $(PGRELAY)) PGRELAY_CONTROL_BIN=$(abspath $(CONTROL)) \
	PGRELAYCTL_BIN=$(abspath $(CTL)) $(PYTHON) -m pytest -v -p no:cacheprovider tests/browser

test: deps
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory unit
	@$(MAKE) --no-print-directory fuzz-regress
	@$(MAKE) --no-print-directory integration
	@$(MAKE) --no-print-directory browser
	@case "$$CI" in ""|0|false|no) ;; *) $(MAKE) --no-print-directory test-patroni;; esac

# ---- fuzzing: libFuzzer from Debian's clang, with AddressSanitizer and UBSan ----
# tests/fuzz/fuzz_NAME.c is a target, tests/fuzz/corpus/NAME/ its checked-in seeds. `make fuzz`
# runs each for FUZZ_SECONDS (new inputs go to build-fuzz/corpus/NAME, a crash to
# build-fuzz/crash-NAME-*) and fails on the first crash; `make fuzz-regress` (part of `make
# test`) runs each target once over its seeds and over any crash input kept in the corpus.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_BUILD   := build-fuzz
FUZZ_CFLAGS  := -std=gnu11 $(WARN) -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
                -fno-sanitize-recover=undefined -D_GNU_SOURCE -DPGRELAY_VERSION='"$(VERSION)"' \
                -Icommon -Iproxy -MMD -MP
FUZZ_TARGETS := $(patsubst tests/fuzz/fuzz_%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_BINS    := $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/fuzz_%)
FUZZ_PKGS    := libevent inih jansson openssl

# What each target links besides its own file (instrumented for coverage).
FUZZ_OBJ_startup := common/pgproto.c
FUZZ_OBJ_scan    := common/pgproto.c
FUZZ_OBJ_cancel  := proxy/cancel.c common/pgproto.c common/shm.c common/config.c \
                    common/inifile.c common/log.c
FUZZ_OBJ_admin   := proxy/admin_commands.c proxy/admin_render.c proxy/utf8.c common/pgproto.c \
                    common/shm.c common/config.c common/inifile.c common/log.c
FUZZ_OBJ_config  := common/config.c common/inifile.c common/log.c
FUZZ_OBJ_sasl    := proxy/tls.c common/tls_files.c common/pgproto.c common/config.c common/inifile.c common/log.c

fuzz_objs = $(addprefix $(FUZZ_BUILD)/obj/,$(patsubst %.c,%.o,$(FUZZ_OBJ_$(1))))

$(FUZZ_BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link $(shell pkg-config --cflags $(FUZZ_PKGS)) \
	  -c -o $@ $<

.SECONDEXPANSION:
$(FUZZ_BUILD)/fuzz_%: $(FUZZ_BUILD)/obj/tests/fuzz/fuzz_%.o \
                      $$(call fuzz_objs,$$*)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -o $@ $^ $(shell pkg-config --libs $(FUZZ_PKGS))

fuzz-build: $(FUZZ_BINS)

# A crash input found later is kept as a seed, so that the regression run replays it for ever.
fuzz-regress: $(FUZZ_BINS)
	@set -e; for t in $(FUZZ_TARGETS); do \
	  echo "== fuzz $$t: $$(ls tests/fuzz/corpus/$$t | wc -l) inputs"; \
	  $(FUZZ_BUILD)/fuzz_$$t -runs=0 -artifact_prefix=$(FUZZ_BUILD)/crash-$$t- \
	    tests/fuzz/corpus/$$t 2>$(FUZZ_BUILD)/regress-$$t.log || \
	    { tail -40 $(FUZZ_BUILD)/regress-$$t.log; exit 1; }; \
	done

fuzz: $(FUZZ_BINS)
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
	  dict=""; [ -f tests/fuzz/$$t.dict ] && dict="-dict=tests/fuzz/$$t.dict"; \
	  $(FUZZ_BUILD)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $$dict \
	    -artifact_prefix=$(FUZZ_BUILD)/crash-$$t- $(FUZZ_BUILD)/corpus/$$t tests/fuzz/corpus/$$t \
	    2>$(FUZZ_BUILD)/fuzz-$$t.log || { tail -60 $(FUZZ_BUILD)/fuzz-$$t.log; exit 1; }; \
	  grep -E 'stat::number_of_executed_units|stat::new_units_added' $(FUZZ_BUILD)/fuzz-$$t.log; \
	done

bench: deps-bench
	@$(MAKE) --no-print-directory all
	bash tests/bench/bench.sh

# The TLS column (not part of test): pgbench -S with sslmode=require at 16 and 64 clients, simple,
# prepared and -C, against PostgreSQL's own TLS, pgrelay terminating TLS (node in clear, and node
# over TLS too) and PgBouncer with client_tls_sslmode = require; direct in clear for reference.
.PHONY: bench-tls
bench-tls: deps-bench
	@$(MAKE) --no-print-directory all
	BENCH_TARGETS="direct direct_tls pgrelay_tls pgrelay_tls_node pgbouncer_tls" \
	BENCH_CLIENTS="$${BENCH_CLIENTS:-16 64}" \
	BENCH_OUT="$${BENCH_OUT:-bench-tls-results.txt}" bash tests/bench/bench.sh

# Failover benchmark (not part of test): detection, first write, propagation, switchover; then
# the Patroni scenarios, pgrelay (ha_source none and patroni) beside HAProxy (BENCH_PATRONI_RUNS).
.PHONY: bench-failover
bench-failover: deps-patroni
	@$(MAKE) --no-print-directory all
	$(PYTHON) tests/bench/failover.py
	PGRELAY_BIN=$(abspath $(PGRELAY)) $(PYTHON) tests/bench/patroni_failover.py

# Control-plane load benchmark (not part of test): N simulated agents on one pgrelay-control;
# BENCH_CONTROL_N (default 100,500,1000,2000) and BENCH_CONTROL_SECONDS (default 10) per size.
.PHONY: bench-control
bench-control: deps
	@$(MAKE) --no-print-directory all
	$(PYTHON) tests/bench/control_load.py

# The Patroni suite (tests/patroni): etcd, three Patroni members, pgrelay and HAProxy.
.PHONY: deps-patroni test-patroni
deps-patroni: deps
	@missing=""; for p in $(DEB_PATRONI); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test-patroni: deps-patroni
	@$(MAKE) --no-print-directory all
	PGRELAY_BIN=$(abspath $(PGRELAY)) $(PYTHON) -m pytest -v -s -p no:cacheprovider tests/patroni

demo: deps
	@$(MAKE) --no-print-directory all
	bash tests/demo.sh

demo-stop:
	bash tests/demo.sh stop

SYSTEMDDIR ?= $(PREFIX)/lib/systemd/system

# Installs binaries, man pages, the sample configurations (as pgrelay.ini and control.ini only
# when none is there yet), the init scripts, their defaults files, the systemd units and the
# logrotate snippet. /etc/pgrelay is root:$(PGRELAY_GROUP) 2775 so that the agent, running as
# that group, can replace pgrelay.ini on `pgrelayctl config apply`; the files that hold
# secrets are root:$(PGRELAY_GROUP) 0640 (the group is set only where it exists).
PGRELAY_GROUP ?= pgrelay
DOCDIR        := $(PREFIX)/share/doc/pgrelay
CONFDIR       := $(SYSCONFDIR)/pgrelay
INSTALLED_FILES := $(SBINDIR)/pgrelay $(SBINDIR)/pgrelay-agent $(SBINDIR)/pgrelay-control \
  $(BINDIR)/pgrelayctl $(MANDIR)/man1/pgrelayctl.1 $(MANDIR)/man5/pgrelay.ini.5 \
  $(MANDIR)/man8/pgrelay.8 $(MANDIR)/man8/pgrelay-agent.8 $(MANDIR)/man8/pgrelay-control.8 \
  $(DOCDIR)/protocol.md $(DOCDIR)/README.md \
  $(CONFDIR)/pgrelay.ini.sample $(CONFDIR)/control.ini.sample \
  $(SYSCONFDIR)/init.d/pgrelay $(SYSCONFDIR)/init.d/pgrelay-control \
  $(SYSTEMDDIR)/pgrelay.service $(SYSTEMDDIR)/pgrelay-control.service \
  $(SYSCONFDIR)/logrotate.d/pgrelay

install: $(PGRELAY) $(AGENT) $(CONTROL) $(CTL)
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1 \
	  $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(DOCDIR) \
	  $(DESTDIR)$(SYSCONFDIR)/init.d $(DESTDIR)$(SYSCONFDIR)/default \
	  $(DESTDIR)$(SYSCONFDIR)/logrotate.d $(DESTDIR)$(SYSTEMDDIR)
	install -d -m 2775 $(DESTDIR)$(CONFDIR)
	install -m 0755 $(PGRELAY) $(DESTDIR)$(SBINDIR)/pgrelay
	install -m 0755 $(AGENT) $(DESTDIR)$(SBINDIR)/pgrelay-agent
	install -m 0755 $(CONTROL) $(DESTDIR)$(SBINDIR)/pgrelay-control
	install -m 0755 $(CTL) $(DESTDIR)$(BINDIR)/pgrelayctl
	# the pages name /usr/share/doc/pgrelay, a package's place: say where the files went
	for m in pgrelayctl.1 pgrelay.ini.5 pgrelay.8 pgrelay-agent.8 pgrelay-control.8; do \
	  sed 's|/usr/share/doc/pgrelay|$(DOCDIR)|g' man/$$m > \
	    $(DESTDIR)$(MANDIR)/man$${m##*.}/$$m && \
	  chmod 0644 $(DESTDIR)$(MANDIR)/man$${m##*.}/$$m || exit 1; done
	install -m 0644 docs/protocol.md README.md $(DESTDIR)$(DOCDIR)/
	install -m 0644 etc/pgrelay.ini $(DESTDIR)$(CONFDIR)/pgrelay.ini.sample
	install -m 0644 etc/control.ini $(DESTDIR)$(CONFDIR)/control.ini.sample
	[ -e $(DESTDIR)$(CONFDIR)/pgrelay.ini ] || \
	  install -m 0640 etc/pgrelay.ini $(DESTDIR)$(CONFDIR)/pgrelay.ini
	[ -e $(DESTDIR)$(CONFDIR)/control.ini ] || \
	  install -m 0640 etc/control.ini $(DESTDIR)$(CONFDIR)/control.ini
	if getent group $(PGRELAY_GROUP) >/dev/null; then \
	  chgrp $(PGRELAY_GROUP) $(DESTDIR)$(CONFDIR) $(DESTDIR)$(CONFDIR)/pgrelay.ini \
	    $(DESTDIR)$(CONFDIR)/control.ini || \
	  echo "note: $(CONFDIR) and its .ini files are not of group $(PGRELAY_GROUP) yet"; fi
	for d in pgrelay pgrelay-control; do \
	  sed 's|@SBINDIR@|$(SBINDIR)|g' etc/init.d/$$d > $(DESTDIR)$(SYSCONFDIR)/init.d/$$d && \
	  chmod 0755 $(DESTDIR)$(SYSCONFDIR)/init.d/$$d && \
	  { [ -e $(DESTDIR)$(SYSCONFDIR)/default/$$d ] || \
	    install -m 0644 etc/default/$$d $(DESTDIR)$(SYSCONFDIR)/default/$$d; } && \
	  sed 's|@SBINDIR@|$(SBINDIR)|g' etc/systemd/$$d.service > \
	    $(DESTDIR)$(SYSTEMDDIR)/$$d.service && \
	  chmod 0644 $(DESTDIR)$(SYSTEMDDIR)/$$d.service || exit 1; done
	install -m 0644 etc/logrotate.d/pgrelay $(DESTDIR)$(SYSCONFDIR)/logrotate.d/pgrelay
	@[ -n "$(DESTDIR)" ] || ! command -v mandb >/dev/null || mandb -q 2>/dev/null || true
	@echo
	@echo "pgrelay is installed. Next steps:"
	@getent passwd pgrelay >/dev/null || \
	  echo "  - create its user: adduser --system --group --no-create-home pgrelay" \
	       "(then: make install again, or chgrp pgrelay $(CONFDIR) $(CONFDIR)/*.ini)"
	@echo "  - edit $(CONFDIR)/pgrelay.ini: its [node.*] sections name the sample's" \
	      "10.0.0.11 and 10.0.0.12; set your nodes, monitor_user and monitor_password"
	@echo "  - check it: $(SBINDIR)/pgrelay -t -c $(CONFDIR)/pgrelay.ini"
	@echo "  - start it: /etc/init.d/pgrelay start, or systemctl enable --now pgrelay"
	@echo "  - a control plane: edit $(CONFDIR)/control.ini (store, tokens), then" \
	      "/etc/init.d/pgrelay-control start or systemctl enable --now pgrelay-control"
	@[ -z "$(DESTDIR)" ] || echo "  - run mandb where the pages land, for man -k and apropos"
	@echo "  - see pgrelay(8), pgrelay.ini(5), pgrelay-control(8); make uninstall removes it"

# Removes what install put in place; pgrelay.ini, control.ini and the defaults files only where
# they are still the installed samples (edited ones are kept, and named).
uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED_FILES))
	for f in $(CONFDIR)/pgrelay.ini:etc/pgrelay.ini $(CONFDIR)/control.ini:etc/control.ini \
	    $(SYSCONFDIR)/default/pgrelay:etc/default/pgrelay \
	    $(SYSCONFDIR)/default/pgrelay-control:etc/default/pgrelay-control; do \
	  dst=$(DESTDIR)$${f%%:*}; [ -e "$$dst" ] || continue; \
	  if cmp -s "$$dst" "$${f#*:}"; then rm -f "$$dst"; \
	  else echo "kept $$dst: it was edited"; fi; done
	rmdir $(DESTDIR)$(CONFDIR) $(DESTDIR)$(DOCDIR) 2>/dev/null || true

format:
	clang-format -i common/*.[ch] proxy/*.[ch] agent/*.[ch] control/*.[ch] ctl/*.[ch] tests/unit/*.c

clean:
	rm -rf build build-* bin bin-*

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
-include $(shell find $(FUZZ_BUILD) -name '*.d' 2>/dev/null)
