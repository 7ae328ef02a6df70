# The two set-up commands (README): `make run` and `make test`.
.PHONY: run test

run:
	scripts/run

test:
	scripts/test
