.PHONY: test demo bench
test:
	scripts/test
demo:
	scripts/demo
bench:
	.venv/bin/python bench/fit_bench.py --scenarios ../shared/bench/fit-scenarios.json
	.venv/bin/python bench/claims_bench.py
	.venv/bin/python bench/migration_bench.py
