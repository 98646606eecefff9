# Two entry points for a fresh machine: `make quickstart` and `make test`.
# Each creates .venv and installs the toolkit on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The PyTorch build to install first. The default pins a CPU-friendly release; pass
# TORCH=torch (or a CUDA wheel spec) to take your platform's default build instead.
TORCH  ?= torch==2.13.0

export HF_HUB_OFFLINE := 1

.PHONY: install quickstart weekly test clean

$(BIN)/rlhf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/rlhf

install: $(BIN)/rlhf

quickstart: install
	$(BIN)/rlhf run recipes/quickstart.yaml

# Three weekly rounds on the quickstart world's weekly preference batches (README "Weekly
# rounds"): the quickstart's SFT policy, then per week `rlhf round add-batch` + `rlhf round run`
# (comparisons of the previous policy's answers; both reward models retrained on all batches so
# far, rejection sampling from the previous round's policy and pool; PPO on top in the third
# round). Each round's comparisons are added as a batch before the next round.
# Re-running resumes where it stopped.
WEEKS := data/world/weeks
weekly: install $(WEEKS)/week3/safety_pairs.jsonl
	$(BIN)/rlhf run recipes/quickstart/base.yaml
	$(BIN)/rlhf run recipes/quickstart/sft.yaml
	@for w in 1 2 3; do \
	  recipe=recipes/quickstart/round.yaml; [ $$w = 3 ] && recipe=recipes/quickstart/round_ppo.yaml; \
	  grep -qs '"status": "complete"' runs/weekly/rounds/00$$w/round.json && continue; \
	  answers=runs/weekly/rounds/00$$((w - 1))/preferences/pairs.jsonl; \
	  [ $$w = 1 ] || grep -qs "\"$$answers\"" runs/weekly/batches/*/batch.json || \
	    $(BIN)/rlhf round add-batch runs/weekly --helpfulness $$answers || exit 1; \
	  grep -qs "week$$w/helpful_pairs.jsonl" runs/weekly/batches/*/batch.json || $(BIN)/rlhf round add-batch runs/weekly \
	    --helpfulness $(WEEKS)/week$$w/helpful_pairs.jsonl --safety $(WEEKS)/week$$w/safety_pairs.jsonl || exit 1; \
	  $(BIN)/rlhf round run runs/weekly --recipe $$recipe || exit 1; \
	done
	$(BIN)/rlhf round status runs/weekly

$(WEEKS)/week3/safety_pairs.jsonl: | $(BIN)/rlhf
	$(BIN)/python -m rlhf.world.generate --out data/world --weekly --force

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
