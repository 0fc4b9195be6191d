# `make demo` runs the whole pipeline on the embedded organism; `make test` runs the suite; `make lint` checks
# formatting and lint (ruff). Each creates .venv when it is missing, so on a fresh machine they are the whole set-up.
VENV := .venv
PYTHON := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
NOTEBOOKS := 00_organism 01_collect 02_normalize 03_train 04_analyze 05_ground_truth 06_compare

$(VENV)/installed: requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

.PHONY: test demo recipe lint browser
test: $(VENV)/installed browser
	$(PYTHON) -m pytest -q

# the dashboard tests open pages in a real Chromium: Debian's package (playwright's own download needs the network)
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

lint: $(VENV)/installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# progress bars (ours, the Hub's and datasets') would be saved in the reports as widgets that static viewers show
# stuck at 0 %.
PAPERMILL := TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1 papermill --log-output

# `make demo PARAMS=dir` gives each notebook the parameters in dir/<notebook>.yaml, where there is one.
demo: $(VENV)/installed
	@mkdir -p outputs
	for nb in $(NOTEBOOKS); do \
		params=; [ -n "$(PARAMS)" ] && [ -f "$(PARAMS)/$$nb.yaml" ] && params="-f $(PARAMS)/$$nb.yaml"; \
		$(PAPERMILL) notebooks/$$nb.ipynb outputs/$$nb.ipynb $$params || exit 1; \
	done

# `make recipe RECIPE=name` runs recipes/name/ (docs/recipes.md): the packages it needs (its requirements.txt, and as
# root its apt.txt), its build_pair.py where it has one (a pair it makes), then each notebook it has parameters for
# (recipes/name/<notebook>.yaml), in order, reports into outputs/name/.
recipe: $(VENV)/installed
	@[ -n "$(RECIPE)" ] && [ -d recipes/$(RECIPE) ] || { echo "name a recipe: make recipe RECIPE=<one of: $$(ls recipes)>"; exit 2; }
	@mkdir -p outputs/$(RECIPE)
	[ ! -f recipes/$(RECIPE)/requirements.txt ] || $(PYTHON) -m pip install -q -r recipes/$(RECIPE)/requirements.txt
	@[ ! -f recipes/$(RECIPE)/apt.txt ] || dpkg -s $$(cat recipes/$(RECIPE)/apt.txt) >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$(cat recipes/$(RECIPE)/apt.txt))
	[ ! -f recipes/$(RECIPE)/build_pair.py ] || $(PYTHON) recipes/$(RECIPE)/build_pair.py --out outputs/$(RECIPE)
	for nb in $(NOTEBOOKS); do \
		[ -f recipes/$(RECIPE)/$$nb.yaml ] || continue; \
		$(PAPERMILL) notebooks/$$nb.ipynb outputs/$(RECIPE)/$$nb.ipynb -f recipes/$(RECIPE)/$$nb.yaml || exit 1; \
	done
